#include <stdio.h>
#include <stdlib.h>
#include <math.h>
#include <stdint.h>
#include "ggml.h"
static uint64_t s=88172645463325252ull;
static double urand(void){ s^=s<<13; s^=s>>7; s^=s<<17; return ((s>>11)+0.5)*(1.0/9007199254740992.0);}
static double gauss(void){ double u=urand(),v=urand(); return sqrt(-2*log(u))*cos(2*M_PI*v);}
static double laplace(void){ double u=urand()-0.5; return (u<0?1:-1)*log(1-2*fabs(u));}
static double student4(void){ double z=gauss(); double c=0; for(int i=0;i<4;i++){double g=gauss(); c+=g*g;} return z/sqrt(c/4);}
static void wht64(float *x){ for(int h=1;h<64;h*=2) for(int i=0;i<64;i+=2*h) for(int j=i;j<i+h;j++){float a=x[j],b=x[j+h];x[j]=a+b;x[j+h]=a-b;} for(int i=0;i<64;i++) x[i]*=0.125f;}
static float f16r(float v){ return ggml_fp16_to_fp32(ggml_fp32_to_fp16(v)); }
// affine 4-level: x ~ m + d*L[q], L sorted ascending, L[0]=0,L[3]=1 ; grid G x G over shrink of lo/hi then LS refit; iters of lloyd refinement
static float L[4];
static int G=12, IT=0; static float STEP=0.05f;
static inline int assign(float x,float m,float d){ // nearest of m+d*L
  float t=(x-m)/d; int q = t < (L[0]+L[1])*0.5f ? 0 : t < (L[1]+L[2])*0.5f ? 1 : t < (L[2]+L[3])*0.5f ? 2 : 3; return q; }
static double fit(const float*x,int B,int*q,double*pm,double*pd){
  double n=B,sq=0,sqq=0,sx=0,sxq=0; for(int j=0;j<B;j++){double l=L[q[j]];sq+=l;sqq+=l*l;sx+=x[j];sxq+=x[j]*l;}
  double det=n*sqq-sq*sq; if(det>1e-20){ *pd=(n*sxq-sq*sx)/det; *pm=(sx-*pd*sq)/n; }
  double e=0; for(int j=0;j<B;j++){ double r=x[j]-*pm-*pd*L[q[j]]; e+=r*r; } return e; }
static void q_aff(const float *x, float *y, int B){
  float mn=x[0],mx=x[0]; for(int j=1;j<B;j++){ if(x[j]<mn)mn=x[j]; if(x[j]>mx)mx=x[j]; }
  double best=INFINITY,bd=(mx-mn),bm=mn; int q[64];
  for(int a=0;a<G;a++) for(int b=0;b<G;b++){
    float lo=mn+(mx-mn)*STEP*a, hi=mx-(mx-mn)*STEP*b; if(hi<=lo) continue;
    double m=lo,d=hi-lo;
    for(int j=0;j<B;j++) q[j]=assign(x[j],m,d);
    double e=fit(x,B,q,&m,&d);
    for(int it=0;it<IT;it++){ for(int j=0;j<B;j++) q[j]=assign(x[j],m,d); e=fit(x,B,q,&m,&d); }
    if(e<best){best=e;bd=d;bm=m;}
  }
  float d=f16r(bd), m=f16r(bm);
  for(int j=0;j<B;j++){ y[j]=m+d*L[assign(x[j],m,d)]; }
}
int main(){
  struct { const char*n; float l1,l2; int g,it; float st; } cf[] = {
    {"A uniform grid12x12 step.05",1/3.f,2/3.f,12,0,0.05f},
    {"A uniform grid1 + 8 lloyd iters",1/3.f,2/3.f,1,8,0.05f},
    {"A uniform grid4x4 step.12 + 2 it",1/3.f,2/3.f,4,2,0.12f},
    {"A uniform grid6x6 step.08 + 1 it",1/3.f,2/3.f,6,1,0.08f},
    {"G affine NU .35/.65 grid12",0.35f,0.65f,12,0,0.05f},
    {"G affine NU .35/.65 grid6 +1it",0.35f,0.65f,6,1,0.08f},
    {"G affine NU .30/.70 grid6 +1it",0.30f,0.70f,6,1,0.08f},
    {"G affine NU .38/.62 grid6 +1it",0.38f,0.62f,6,1,0.08f},
  };
  const char *dn[3]={"gauss","laplace","t4"};
  for(int c=0;c<8;c++){ L[0]=0;L[1]=cf[c].l1;L[2]=cf[c].l2;L[3]=1;G=cf[c].g;IT=cf[c].it;STEP=cf[c].st;
    printf("%-36s",cf[c].n);
    for(int dist=0;dist<3;dist++){ s=88172645463325252ull + dist*1000 + 1; double se=0,sx=0;
      for(int i=0;i<20000;i++){ float x[64],y[64]; for(int j=0;j<64;j++) x[j]= dist==0?gauss():dist==1?laplace():student4(); wht64(x); q_aff(x,y,64);
        for(int j=0;j<64;j++){ se+=(x[j]-y[j])*(x[j]-y[j]); sx+=x[j]*x[j]; } }
      printf(" %s+H %.5f",dn[dist],se/sx); }
    printf("\n"); }
}
