/* Probe: Q x K^T of a 7 x 7 window for the window kernel's 4 x 2 query blocks,
 * two ways, one (batch, head) of 64 x 64 tokens, D = 32, 16 of them cycled,
 * interior blocks, one thread: (a) as the kernel does it (lanes = the block's
 * eight queries, each key of the 10 x 8 union broadcast from row-major K: 2,560
 * FMAs a block); (b) lanes = eight keys of a union row from a transposed key
 * panel, each query element broadcast, only the rows a query reaches (1,792
 * FMAs). Both checked against a scalar dot product. Results in NOTES.md.
 *   gcc -O3 -march=x86-64-v4 -ffp-contract=fast -o window_keys_probe benchmarks/window_keys_in_lanes_probe.c */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#define H 64
#define W 64
#define D 32
#define PAD 8
#define RS (W + 2 * PAD)
#define ITEMS 16
#define AI static inline __attribute__((always_inline))
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+1e-9*t.tv_nsec;}

/* (a) as the window kernel: lanes = the block's 8 queries, keys broadcast from row-major K */
AI void union_row(const v8 *qt, const float *keys, v8 *out){
  v8 acc[8]; for(int j=0;j<8;j++) acc[j]=(v8){0};
  for (int d=0; d<D; d++){ const v8 qd=qt[d]; for(int j=0;j<8;j++) acc[j]+=qd*keys[j*D+d]; }
  for(int j=0;j<8;j++) out[j]=acc[j];
}
__attribute__((noinline)) void qk_union(const float *q, const float *k, float *scores){
  v8 qt[D] __attribute__((aligned(32)));
  for (int y0=0;y0<H;y0+=4) for (int x0=0;x0<W;x0+=2){
    if (y0<3||y0+4+3>H||x0<3||x0+2+4>W) continue; /* interior only */
    for (int d=0; d<D; d++) for (int l=0;l<8;l++) qt[d][l]=q[((y0+l/2)*W+x0+l%2)*D+d];
    v8 *out=(v8*)(scores+((size_t)(y0/4)*(W/2)+x0/2)*80*8);
    for (int r=0;r<10;r++) union_row(qt, k+((size_t)(y0-3+r)*W+x0-3)*D, out+r*8);
  }
}
/* (b) lanes = 8 keys of a union row (from a transposed panel), query elements broadcast */
AI void key_row(const float *q, const float *kp_row, int y0, int x0, int first, const int count, v8 *out){
  v8 acc[4][2];
  for(int i=0;i<count;i++){acc[i][0]=(v8){0};acc[i][1]=(v8){0};}
  const float *qb = q + ((size_t)(y0+first)*W + x0)*D;
  for (int d=0; d<D; d++){
    const v8 kv = *(const v8u*)(kp_row + d*RS + PAD + x0 - 3);
    for (int i=0;i<count;i++){ acc[i][0] += kv*qb[i*W*D + d]; acc[i][1] += kv*qb[i*W*D + D + d]; }
  }
  for(int i=0;i<count;i++){ out[2*i]=acc[i][0]; out[2*i+1]=acc[i][1]; }
}
__attribute__((noinline)) void qk_keys(const float *q, const float *kp, float *scores){
  for (int y0=0;y0<H;y0+=4) for (int x0=0;x0<W;x0+=2){
    if (y0<3||y0+4+3>H||x0<3||x0+2+4>W) continue;
    v8 *out=(v8*)(scores+((size_t)(y0/4)*(W/2)+x0/2)*80*8);
    const float *kr = kp + (size_t)(y0-3)*D*RS;
    key_row(q,kr+0*D*RS,y0,x0,0,1,out); out+=2;
    key_row(q,kr+1*D*RS,y0,x0,0,2,out); out+=4;
    key_row(q,kr+2*D*RS,y0,x0,0,3,out); out+=6;
    key_row(q,kr+3*D*RS,y0,x0,0,4,out); out+=8;
    key_row(q,kr+4*D*RS,y0,x0,0,4,out); out+=8;
    key_row(q,kr+5*D*RS,y0,x0,0,4,out); out+=8;
    key_row(q,kr+6*D*RS,y0,x0,0,4,out); out+=8;
    key_row(q,kr+7*D*RS,y0,x0,1,3,out); out+=6;
    key_row(q,kr+8*D*RS,y0,x0,2,2,out); out+=4;
    key_row(q,kr+9*D*RS,y0,x0,3,1,out);
  }
}
AI void transpose8(v8 r[8]){
  __m256 t0=_mm256_unpacklo_ps((__m256)r[0],(__m256)r[1]),t1=_mm256_unpackhi_ps((__m256)r[0],(__m256)r[1]),t2=_mm256_unpacklo_ps((__m256)r[2],(__m256)r[3]),t3=_mm256_unpackhi_ps((__m256)r[2],(__m256)r[3]);
  __m256 t4=_mm256_unpacklo_ps((__m256)r[4],(__m256)r[5]),t5=_mm256_unpackhi_ps((__m256)r[4],(__m256)r[5]),t6=_mm256_unpacklo_ps((__m256)r[6],(__m256)r[7]),t7=_mm256_unpackhi_ps((__m256)r[6],(__m256)r[7]);
  __m256 u0=_mm256_shuffle_ps(t0,t2,0x44),u1=_mm256_shuffle_ps(t0,t2,0xEE),u2=_mm256_shuffle_ps(t1,t3,0x44),u3=_mm256_shuffle_ps(t1,t3,0xEE);
  __m256 u4=_mm256_shuffle_ps(t4,t6,0x44),u5=_mm256_shuffle_ps(t4,t6,0xEE),u6=_mm256_shuffle_ps(t5,t7,0x44),u7=_mm256_shuffle_ps(t5,t7,0xEE);
  r[0]=(v8)_mm256_permute2f128_ps(u0,u4,0x20); r[1]=(v8)_mm256_permute2f128_ps(u1,u5,0x20); r[2]=(v8)_mm256_permute2f128_ps(u2,u6,0x20); r[3]=(v8)_mm256_permute2f128_ps(u3,u7,0x20);
  r[4]=(v8)_mm256_permute2f128_ps(u0,u4,0x31); r[5]=(v8)_mm256_permute2f128_ps(u1,u5,0x31); r[6]=(v8)_mm256_permute2f128_ps(u2,u6,0x31); r[7]=(v8)_mm256_permute2f128_ps(u3,u7,0x31);
}
__attribute__((noinline)) void build_panel(const float *k, float *kp){
  for (int y=0;y<H;y++){ float *row=kp+(size_t)y*D*RS;
    for (int d=0;d<D;d++){ memset(row+d*RS,0,PAD*4); memset(row+d*RS+PAD+W,0,PAD*4); }
    for (int x0=0;x0<W;x0+=8) for (int d0=0; d0<D; d0+=8){ v8 b[8];
      for(int i=0;i<8;i++) b[i]=*(const v8u*)(k+((size_t)y*W+x0+i)*D+d0);
      transpose8(b);
      for(int i=0;i<8;i++) *(v8u*)(row+(d0+i)*RS+PAD+x0)=b[i]; } }
}
int main(){
  size_t tok=(size_t)H*W*D;
  float *q=aligned_alloc(64,ITEMS*tok*4), *k=aligned_alloc(64,ITEMS*tok*4), *kp=aligned_alloc(64,(size_t)ITEMS*H*D*RS*4);
  float *sa=aligned_alloc(64,(size_t)ITEMS*(H/4)*(W/2)*80*8*4), *sb=aligned_alloc(64,(size_t)ITEMS*(H/4)*(W/2)*80*8*4);
  for(size_t i=0;i<ITEMS*tok;i++){q[i]=rand()/(float)RAND_MAX-0.5f;k[i]=rand()/(float)RAND_MAX-0.5f;}
  double best[3]={1e9,1e9,1e9};
  for (int rep=0;rep<15;rep++){
    double t=now(); for(int it=0;it<ITEMS;it++) build_panel(k+it*tok,kp+(size_t)it*H*D*RS); double t1=now(); if((t1-t)/ITEMS<best[0]) best[0]=(t1-t)/ITEMS;
    t=now(); for(int it=0;it<ITEMS;it++) qk_union(q+it*tok,k+it*tok,sa+(size_t)it*(H/4)*(W/2)*80*8); t1=now(); if((t1-t)/ITEMS<best[1]) best[1]=(t1-t)/ITEMS;
    t=now(); for(int it=0;it<ITEMS;it++) qk_keys(q+it*tok,kp+(size_t)it*H*D*RS,sb+(size_t)it*(H/4)*(W/2)*80*8); t1=now(); if((t1-t)/ITEMS<best[2]) best[2]=(t1-t)/ITEMS;
  }
  /* check one block: query (y0+1, x0+1) against key (y0+1+dy, x0+1+dx) in both layouts */
  int y0=8,x0=10; const float *Q=q,*K=k; double maxerr=0;
  for (int qi=0; qi<8; qi++) for (int dy=-3;dy<=3;dy++) for(int dx=-3;dx<=3;dx++){
    int qy=y0+qi/2, qx=x0+qi%2, ky=qy+dy, kx=qx+dx; double ref=0; for(int d=0;d<D;d++) ref+=Q[(qy*W+qx)*D+d]*K[(ky*W+kx)*D+d];
    int r=ky-(y0-3), c=kx-(x0-3);
    float ua=sa[(((size_t)(y0/4)*(W/2)+x0/2)*80 + r*8+c)*8 + qi];
    /* layout b: rows in order, each with 2*count vectors [query row i][col] of 8 key lanes */
    int first[10]={0,0,0,0,0,0,0,1,2,3}, off=0; for(int rr=0;rr<r;rr++){int cnt[10]={1,2,3,4,4,4,4,3,2,1}; off+=2*cnt[rr];}
    int vi = off + 2*(qi/2-first[r]) + qi%2; float ub=sb[(((size_t)(y0/4)*(W/2)+x0/2)*80 + vi)*8 + (kx-(qx-qi%2)+3)];
    double e1=ua-ref, e2=ub-ref; if(e1<0)e1=-e1; if(e2<0)e2=-e2; if(e1>maxerr)maxerr=e1; if(e2>maxerr)maxerr=e2; }
  printf("per (b,h) ms, interior blocks: K panel build %.3f  union (lanes = queries, 2560 FMAs a block) %.3f  keys in lanes (1792) %.3f  max err %.1e\n",best[0]*1e3,best[1]*1e3,best[2]*1e3,maxerr);
}
