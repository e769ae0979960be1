#include <stdio.h>
#include <math.h>
#include <stdint.h>
#include <time.h>
static uint64_t s=88172645463325252ull;
static double urand(void){ s^=s<<13; s^=s>>7; s^=s<<17; return ((s>>11)+0.5)*(1.0/9007199254740992.0);}
static double gauss(void){ double u=urand(),v=urand(); return sqrt(-2*log(u))*cos(2*M_PI*v);}
static void wht64(float *x){ for(int h=1;h<64;h*=2) for(int i=0;i<64;i+=2*h) for(int j=i;j<i+h;j++){float a=x[j],b=x[j+h];x[j]=a+b;x[j+h]=a-b;} for(int i=0;i<64;i++) x[i]*=0.125f;}
static int G, P; static float ST;
__attribute__((noinline)) static void q(const float *x, float *y){
  float mn=x[0],mx=x[0]; for(int j=1;j<64;j++){ mn=mn<x[j]?mn:x[j]; mx=mx>x[j]?mx:x[j]; }
  float r=mx-mn, bd=0, bm=mn;
  if (r>0) {
  // fixed point relative to mn: xi in [0, 2^20]
  const float sc = (float)(1<<20)/r, isc = r/(float)(1<<20);
  int32_t xi[64]; int64_t sx=0, sxx=0;
  for(int j=0;j<64;j++){ xi[j]=(int32_t)((x[j]-mn)*sc+0.5f); sx+=xi[j]; sxx+=(int64_t)xi[j]*xi[j]; }
  double be=INFINITY;
  for(int ia=0;ia<G;ia++) for(int ib=0;ib<G;ib++){
    double m=ST*ia*(1<<20), d=(1.0-ST*(ia+ib))*(1<<20)/3, e=INFINITY;
    for(int it=0;it<P && d>0;it++){
      const int32_t t0=(int32_t)ceil(m+0.5*d), t1=(int32_t)ceil(m+1.5*d), t2=(int32_t)ceil(m+2.5*d);
      int32_t c0=0,c1=0,c2=0, s0=0,s1=0,s2=0;
      for(int j=0;j<64;j++){ const int32_t v=xi[j]; const int32_t f0=-(v>=t0), f1=-(v>=t1), f2=-(v>=t2);
        c0+=f0; c1+=f1; c2+=f2; s0+=v&f0; s1+=v&f1; s2+=v&f2; }
      c0=-c0; c1=-c1; c2=-c2;
      const double sq=c0+c1+c2, sqq=c0+3.0*c1+5.0*c2, sxq=(double)s0+s1+s2;
      const double det=64*sqq-sq*sq; if(det<=0) break;
      d=(64*sxq-sq*sx)/det; m=(sx-d*sq)/64; e=sxx-m*sx-d*sxq; }
    if(d>0&&e<be){be=e;bd=d*isc;bm=mn+m*isc;}
  }
  }
  float id=bd>0?1/bd:0; for(int j=0;j<64;j++){ float t=(x[j]-bm)*id; t=t>0?t:0; t=t<3?t:3; int v=(int)(t+0.5f); y[j]=bm+bd*v; }
}
int main(){
  int cfg[][2]={{1,1},{6,2},{6,3},{8,3},{4,3},{4,4},{3,4},{2,4}}; float st[]={0,.08f,.08f,.06f,.12f,.12f,.15f,.2f};
  static float X[20000][64]; s=1; for(int i=0;i<20000;i++){ for(int j=0;j<64;j++) X[i][j]=gauss(); wht64(X[i]); }
  for(int c=0;c<8;c++){ G=cfg[c][0];P=cfg[c][1];ST=st[c]; double se=0,sx=0; static float Y[20000][64];
    struct timespec t0,t1; clock_gettime(CLOCK_MONOTONIC,&t0);
    for(int i=0;i<20000;i++) q(X[i],Y[i]);
    clock_gettime(CLOCK_MONOTONIC,&t1);
    for(int i=0;i<20000;i++) for(int j=0;j<64;j++){ se+=(X[i][j]-Y[i][j])*(X[i][j]-Y[i][j]); sx+=X[i][j]*X[i][j]; }
    printf("grid %dx%d step %.2f passes %d: nmse %.5f  %.0f ns/block\n",G,G,ST,P,se/sx,((t1.tv_sec-t0.tv_sec)*1e9+(t1.tv_nsec-t0.tv_nsec))/20000); }
}
