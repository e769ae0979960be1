#include <stdio.h>
#include <math.h>
#include <stdint.h>
#include <time.h>
static uint64_t s=88172645463325252ull;
static double urand(void){ s^=s<<13; s^=s>>7; s^=s<<17; return ((s>>11)+0.5)*(1.0/9007199254740992.0);}
static double gauss(void){ double u=urand(),v=urand(); return sqrt(-2*log(u))*cos(2*M_PI*v);}
static void wht64(float *x){ for(int h=1;h<64;h*=2) for(int i=0;i<64;i+=2*h) for(int j=i;j<i+h;j++){float a=x[j],b=x[j+h];x[j]=a+b;x[j+h]=a-b;} for(int i=0;i<64;i++) x[i]*=0.125f;}
static int G, P; static float ST;
static void q(const float *x, float *y){
  float mn=x[0],mx=x[0]; for(int j=1;j<64;j++){ mn=fminf(mn,x[j]); mx=fmaxf(mx,x[j]); }
  float sx=0,sxx=0; for(int j=0;j<64;j++){sx+=x[j];sxx+=x[j]*x[j];}
  float r=mx-mn, be=INFINITY, bd=0, bm=mn;
  for(int a=0;a<G;a++) for(int b=0;b<G;b++){
    float m=mn+ST*a*r, d=(r-ST*(a+b)*r)/3, e=INFINITY;
    for(int it=0;it<P && d>0;it++){ float id=1/d, sq=0,sqq=0,sxq=0;
      for(int j=0;j<64;j++){ float t=(x[j]-m)*id; t=t>0?t:0; t=t<3?t:3; int v=(int)(t+0.5f); sq+=v; sqq+=v*v; sxq+=x[j]*v; }
      float det=64*sqq-sq*sq; if(det<=0) break; d=(64*sxq-sq*sx)/det; m=(sx-d*sq)/64; e=sxx-m*sx-d*sxq; }
    if(d>0&&e<be){be=e;bd=d;bm=m;}
  }
  float id=bd>0?1/bd:0; for(int j=0;j<64;j++){ float t=(x[j]-bm)*id; t=t>0?t:0; t=t<3?t:3; int v=(int)(t+0.5f); y[j]=bm+bd*v; }
}
int main(){
  int cfg[][2]={{6,2},{4,2},{4,3},{3,2},{3,3},{2,3},{2,4},{1,4},{1,8}}; float st[]={.08f,.12f,.12f,.15f,.15f,.2f,.2f,0,0};
  for(int c=0;c<9;c++){ G=cfg[c][0];P=cfg[c][1];ST=st[c]; s=1; double se=0,sx=0; static float X[20000][64]; float y[64];
    for(int i=0;i<20000;i++){ for(int j=0;j<64;j++) X[i][j]=gauss(); wht64(X[i]); }
    struct timespec t0,t1; clock_gettime(CLOCK_MONOTONIC,&t0);
    for(int i=0;i<20000;i++){ q(X[i],y); for(int j=0;j<64;j++){ se+=(X[i][j]-y[j])*(X[i][j]-y[j]); sx+=X[i][j]*X[i][j]; } }
    clock_gettime(CLOCK_MONOTONIC,&t1);
    printf("grid %dx%d step %.2f passes %d: nmse %.5f  %.0f ns/block (incl. err acc)\n",G,G,ST,P,se/sx,((t1.tv_sec-t0.tv_sec)*1e9+(t1.tv_nsec-t0.tv_nsec))/20000); }
}
