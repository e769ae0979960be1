#include <stdio.h>
#include <math.h>
#include <stdint.h>
#include <time.h>
static uint64_t s=88172645463325252ull;
static double urand(void){ s^=s<<13; s^=s>>7; s^=s<<17; return ((s>>11)+0.5)*(1.0/9007199254740992.0);}
static double gauss(void){ double u=urand(),v=urand(); return sqrt(-2*log(u))*cos(2*M_PI*v);}
static void wht64(float *x){ for(int h=1;h<64;h*=2) for(int i=0;i<64;i+=2*h) for(int j=i;j<i+h;j++){float a=x[j],b=x[j+h];x[j]=a+b;x[j+h]=a-b;} for(int i=0;i<64;i++) x[i]*=0.125f;}
static int G, P; static float ST;
static inline int lower(const float *a, float t){ const float *b=a; int n=64; while(n>1){ int h=n/2; b = (b[h-1] < t) ? b+h : b; n-=h; } return (int)(b-a) + (*b < t); }
static void q(const float *x, float *y){
  float a[64], pre[65]; 
  for(int i=0;i<64;i++){ float v=x[i]; int j=i; while(j>0 && a[j-1]>v){ a[j]=a[j-1]; j--; } a[j]=v; }
  pre[0]=0; for(int i=0;i<64;i++) pre[i+1]=pre[i]+a[i];
  float mn=a[0],mx=a[63], sx=pre[64], sxx=0; for(int j=0;j<64;j++) sxx+=a[j]*a[j];
  float r=mx-mn, be=INFINITY, bd=0, bm=mn;
  for(int ia=0;ia<G;ia++) for(int ib=0;ib<G;ib++){
    float m=mn+ST*ia*r, d=(r-ST*(ia+ib)*r)/3, e=INFINITY;
    for(int it=0;it<P && d>0;it++){
      int b0=lower(a,m+0.5f*d), b1=lower(a,m+1.5f*d), b2=lower(a,m+2.5f*d);
      float n1=b1-b0, n2=b2-b1, n3=64-b2;
      float sq=n1+2*n2+3*n3, sqq=n1+4*n2+9*n3, sxq=(pre[b1]-pre[b0]) + 2*(pre[b2]-pre[b1]) + 3*(pre[64]-pre[b2]);
      float det=64*sqq-sq*sq; if(det<=0) break; d=(64*sxq-sq*sx)/det; m=(sx-d*sq)/64; e=sxx-m*sx-d*sxq; }
    if(d>0&&e<be){be=e;bd=d;bm=m;}
  }
  float id=bd>0?1/bd:0; for(int j=0;j<64;j++){ float t=(x[j]-bm)*id; t=t>0?t:0; t=t<3?t:3; int v=(int)(t+0.5f); y[j]=bm+bd*v; }
}
int main(){
  int cfg[][2]={{1,1},{6,3},{8,3},{4,3},{4,4},{3,4},{2,4}}; float st[]={.08f,.08f,.06f,.12f,.12f,.15f,.2f};
  static float X[20000][64]; s=1; for(int i=0;i<20000;i++){ for(int j=0;j<64;j++) X[i][j]=gauss(); wht64(X[i]); }
  for(int c=0;c<7;c++){ G=cfg[c][0];P=cfg[c][1];ST=st[c]; double se=0,sx=0; float y[64];
    struct timespec t0,t1; clock_gettime(CLOCK_MONOTONIC,&t0);
    for(int i=0;i<20000;i++){ q(X[i],y); for(int j=0;j<64;j++){ se+=(X[i][j]-y[j])*(X[i][j]-y[j]); sx+=X[i][j]*X[i][j]; } }
    clock_gettime(CLOCK_MONOTONIC,&t1);
    printf("grid %dx%d step %.2f passes %d: nmse %.5f  %.0f ns/block\n",G,G,ST,P,se/sx,((t1.tv_sec-t0.tv_sec)*1e9+(t1.tv_nsec-t0.tv_nsec))/20000); }
}
