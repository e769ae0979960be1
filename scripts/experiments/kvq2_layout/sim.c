// candidate-layout simulator for kvq2
#include <stdio.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#include <stdint.h>
#include "ggml.h"
void quantize_row_q2_0_ref(const float *x, void *y, int64_t k);
void dequantize_row_q2_0(const void *x, float *y, int64_t k);
void quantize_row_q4_0_ref(const float *x, void *y, int64_t k);
void dequantize_row_q4_0(const void *x, float *y, int64_t k);

static uint64_t s=88172645463325252ull;
static double urand(void){ s^=s<<13; s^=s>>7; s^=s<<17; return ((s>>11)+0.5)*(1.0/9007199254740992.0);}
static double gauss(void){ double u=urand(),v=urand(); return sqrt(-2*log(u))*cos(2*M_PI*v);}
static double laplace(void){ double u=urand()-0.5; return (u<0?1:-1)*log(1-2*fabs(u));}
static double student4(void){ double z=gauss(); double c=0; for(int i=0;i<4;i++){double g=gauss(); c+=g*g;} return z/sqrt(c/4);}
static void wht64(float *x){ for(int h=1;h<64;h*=2) for(int i=0;i<64;i+=2*h) for(int j=i;j<i+h;j++){float a=x[j],b=x[j+h];x[j]=a+b;x[j+h]=a-b;} for(int i=0;i<64;i++) x[i]*=0.125f;}
static float f16r(float v){ return ggml_fp16_to_fp32(ggml_fp32_to_fp16(v)); }

// symmetric 4-level quantizer with levels {-L1,-L0,L0,L1}*d, search over d
static int NSTEP=96;
static void q_sym(const float *x, float *y, int B, float L0, float L1){
  float amax=0; for(int j=0;j<B;j++) if(fabsf(x[j])>amax) amax=fabsf(x[j]);
  if(amax==0){ for(int j=0;j<B;j++) y[j]=0; return; }
  float thr=(L0+L1)*0.5f;
  float best=INFINITY, bd=amax/L1;
  for(int it=0; it<NSTEP; it++){
    float d = amax/L1 * (0.25f + 0.85f*it/(NSTEP>1?NSTEP-1:1));
    if (NSTEP==1) d = amax/L1;
    float sxl=0,sll=0;
    for(int j=0;j<B;j++){ float a=fabsf(x[j]); float l = a > thr*d ? L1 : L0; sxl+=a*l; sll+=l*l; }
    float dd = sxl/sll;
    float e=0; for(int j=0;j<B;j++){ float a=fabsf(x[j]); float l = a > thr*d ? L1 : L0; float r=a-l*dd; e+=r*r; }
    if(e<best){best=e; bd=dd;}
  }
  float d=f16r(bd);
  for(int j=0;j<B;j++){ float a=fabsf(x[j]); float l = a > thr*d ? L1 : L0; y[j]= x[j]<0 ? -l*d : l*d; }
}
// asymmetric uniform: x ~ m + d*q, q in 0..3; search over (lo,hi) shrink, LS refit
static void q_asym(const float *x, float *y, int B){
  float mn=x[0],mx=x[0]; for(int j=1;j<B;j++){ if(x[j]<mn)mn=x[j]; if(x[j]>mx)mx=x[j]; }
  if(mx==mn){ for(int j=0;j<B;j++) y[j]=f16r(mn); return; }
  float best=INFINITY,bd=0,bm=0; int q[256];
  for(int a=0;a<12;a++) for(int b=0;b<12;b++){
    float lo=mn*(1-0.05f*a), hi=mx*(1-0.05f*b);
    float d=(hi-lo)/3; if(d<=0) continue;
    for(int j=0;j<B;j++){ int v=(int)lrintf((x[j]-lo)/d); q[j]=v<0?0:v>3?3:v; }
    // LS fit of (m,d)
    double n=B,sq=0,sqq=0,sx=0,sxq=0; for(int j=0;j<B;j++){sq+=q[j];sqq+=q[j]*q[j];sx+=x[j];sxq+=x[j]*q[j];}
    double det=n*sqq-sq*sq; double dd=d,mm=lo;
    if(det>0){ dd=(n*sxq-sq*sx)/det; mm=(sx-dd*sq)/n; }
    double e=0; for(int j=0;j<B;j++){ double r=x[j]-mm-dd*q[j]; e+=r*r; }
    if(e<best){best=e;bd=dd;bm=mm;}
  }
  float d=f16r(bd), m=f16r(bm);
  for(int j=0;j<B;j++){ int v=(int)lrintf((x[j]-m)/d); v=v<0?0:v>3?3:v; y[j]=m+d*v; }
}

enum { C_A, C_B, C_C, C_D, C_E, C_F, C_Q2, C_Q4, NC };
static const char *names[NC]={"A blk64 asym uniform (f16 d+m) 2.50","B blk32 NU {+-0.3,+-1}d     2.50","C blk64 sym uniform {+-1,+-3}d 2.25","D blk64 NU {+-0.3,+-1}d     2.25","E blk32 sym uniform {+-1,+-3}d 2.50","F blk64 NU, d=amax only (no search) 2.25","stock Q2_0 (blk64)          2.25","stock Q4_0 (blk32)          4.50"};
static void quant(int c, const float *x, float *y){ // 64 elements
  unsigned char buf[256];
  switch(c){
    case C_A: q_asym(x,y,64); break;
    case C_B: q_sym(x,y,32,0.3f,1.f); q_sym(x+32,y+32,32,0.3f,1.f); break;
    case C_C: q_sym(x,y,64,1.f,3.f); break;
    case C_D: q_sym(x,y,64,0.3f,1.f); break;
    case C_E: q_sym(x,y,32,1.f,3.f); q_sym(x+32,y+32,32,1.f,3.f); break;
    case C_F: { int o=NSTEP; NSTEP=1; q_sym(x,y,64,0.3f,1.f); NSTEP=o; } break;
    case C_Q2: quantize_row_q2_0_ref(x,buf,64); dequantize_row_q2_0(buf,y,64); break;
    case C_Q4: quantize_row_q4_0_ref(x,buf,64); dequantize_row_q4_0(buf,y,64); break;
  }
}
int main(int argc,char**argv){
  int NR = 20000;
  const char *dn[3]={"gauss","laplace","t4"};
  if(argc>1){ // ratio sweep for NU blk64 on WHT gaussian
    for(float r=0.20f;r<=0.46f;r+=0.02f){ double se=0,sx=0; s=1234;
      for(int i=0;i<NR;i++){ float x[64],y[64]; for(int j=0;j<64;j++) x[j]=gauss(); wht64(x); q_sym(x,y,64,r,1.f); q_sym(x,y,64,r,1.f);
        for(int j=0;j<64;j++){ se+=(x[j]-y[j])*(x[j]-y[j]); sx+=x[j]*x[j]; } }
      printf("ratio %.2f nmse %.5f\n", r, se/sx); }
    return 0;
  }
  printf("%-40s", "candidate (bpw)");
  for(int w=0;w<2;w++) for(int d=0;d<3;d++) printf(" %9s%s", dn[d], w?"+H":"");
  printf(" | dot-rel(g+H)\n");
  for(int c=0;c<NC;c++){
    printf("%-40s", names[c]);
    double dotrel=0;
    for(int w=0;w<2;w++) for(int dist=0;dist<3;dist++){
      s=88172645463325252ull + dist*1000 + w; double se=0,sx=0, de=0, dx=0;
      for(int i=0;i<NR;i++){
        float x[64],y[64],q[64];
        for(int j=0;j<64;j++) x[j] = dist==0?gauss():dist==1?laplace():student4();
        if(w) wht64(x);
        quant(c,x,y);
        for(int j=0;j<64;j++){ se+=(x[j]-y[j])*(x[j]-y[j]); sx+=x[j]*x[j]; }
        if(w){ double a=0,b=0; for(int j=0;j<64;j++){ q[j]=gauss(); a+=q[j]*x[j]; b+=q[j]*y[j]; } de+=(a-b)*(a-b); dx+=a*a; }
      }
      printf(" %11.5f", se/sx);
      if(w&&dist==0) dotrel=sqrt(de/dx);
    }
    printf(" | %.4f\n", dotrel);
  }
  return 0;
}
