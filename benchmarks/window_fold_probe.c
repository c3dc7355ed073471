/* Q x K^T of a 7 x 7 window, D = 32, keys with a halo, two ways:
 * (a) the kernel's 4 x 2 block: lanes = 8 queries, the 10 x 8 union, two union
 *     rows a pass (16 accumulators), one key broadcast per FMA: 80 slots;
 * (b) an 8 x 1 block (a column of 8 queries): union rows r and r + 7 folded
 *     into one slot row (query rows <= r reach row r, the others row r + 7), so
 *     7 x 7 = 49 slots, all useful; the key vector is a broadcast of row r's key
 *     merged (masked broadcast) with row r + 7's: two loads per FMA;
 * (c) the 4 x 2 block again, its union rows r and r + 7 (r = 0..2) computed in
 *     one pass whose key vector comes from eight d of each key by one
 *     two-source permute (vpermt2ps), stored to both rows: 1,792 FMAs.
 * One thread, all 512 blocks of each layout, min of 15; ITEMS (batch, head)
 * cycled (1: inputs in the caches). Checked against a scalar dot product.
 * Results in NOTES.md.
 *   gcc -O3 -march=x86-64-v4 -ffp-contract=fast -DITEMS=1 -o fold benchmarks/window_fold_probe.c */
#include <immintrin.h>
#include <stdio.h>

#include "window_probe_common.h"
#define H 64
#define W 64
#define D 32
#define R 3
#define PW (W + 2 * R)
#define PH (H + 2 * R)
#ifndef ITEMS
#define ITEMS 16
#endif
#define AI static inline __attribute__((always_inline))
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));

AI void transpose_q(const float *q, int y0, int x0, int bw, v8 *qt){
  for (int d=0; d<D; d++) for (int l=0;l<8;l++) qt[d][l]=q[((y0+l/bw)*W+x0+l%bw)*D+d];
}
/* (a) */
AI void union_two_rows(const v8 *qt, const float *ka, const float *kb, v8 *oa, v8 *ob){
  v8 aa[8], ab[8];
  for(int j=0;j<8;j++) aa[j]=ab[j]=(v8){0};
  for (int d=0; d<D; d++){ const v8 qd=qt[d];
    for(int j=0;j<8;j++){ aa[j]+=qd*ka[j*D+d]; ab[j]+=qd*kb[j*D+d]; } }
  for(int j=0;j<8;j++){ oa[j]=aa[j]; ob[j]=ab[j]; }
}
__attribute__((noinline)) void qk_union(const float *q, const float *k, v8 *scores){
  v8 qt[D] __attribute__((aligned(32)));
  for (int y0=0;y0<H;y0+=4) for (int x0=0;x0<W;x0+=2){
    transpose_q(q,y0,x0,2,qt);
    v8 *out = scores + ((size_t)(y0/4)*(W/2)+x0/2)*80;
    for (int r=0;r<10;r+=2){
      const float *ka = k + ((size_t)(y0+r)*PW + x0)*D;
      union_two_rows(qt, ka, ka + PW*D, out + r*8, out + (r+1)*8);
    }
  }
}
/* (c) the 4 x 2 block with its union rows r and r + 7 (r = 0..2) folded: lanes 0..2r+1 take union row r's key, the rest row r + 7's;
 * the key vector of d made by one two-source permute from 8 d of each key */
AI void permuted_fold_row(const v8 *qt, const float *ka, const float *kb, __m256i idx0, v8 *out_a, v8 *out_b){
  v8 acc[8], odd[8];
  for(int j=0;j<8;j++) acc[j]=odd[j]=(v8){0};
  for (int d0=0; d0<D; d0+=8){
    for (int j=0;j<8;j++){
      const __m256 a = (__m256)*(const v8u*)(ka + j*D + d0), b = (__m256)*(const v8u*)(kb + j*D + d0);
      __m256i idx = idx0;
      for (int i=0;i<8;i+=2){
        const v8 kv0 = (v8)_mm256_permutex2var_ps(a, idx, b);
        idx = _mm256_add_epi32(idx, _mm256_set1_epi32(1));
        const v8 kv1 = (v8)_mm256_permutex2var_ps(a, idx, b);
        idx = _mm256_add_epi32(idx, _mm256_set1_epi32(1));
        acc[j] += qt[d0+i]*kv0; odd[j] += qt[d0+i+1]*kv1;
      }
    }
  }
  for(int j=0;j<8;j++){ out_a[j]=acc[j]+odd[j]; out_b[j]=out_a[j]; }
}
__attribute__((noinline)) void qk_fold_permuted(const float *q, const float *k, v8 *scores){
  v8 qt[D] __attribute__((aligned(32)));
  for (int y0=0;y0<H;y0+=4) for (int x0=0;x0<W;x0+=2){
    transpose_q(q,y0,x0,2,qt);
    v8 *out = scores + ((size_t)(y0/4)*(W/2)+x0/2)*80;
    for (int r=0;r<3;r++){
      const float *ka = k + ((size_t)(y0+r)*PW + x0)*D;
      /* lane l takes a[d] (index d) if l <= 2r+1 else b[d] (index 8 + d) */
      __m256i idx0 = _mm256_setr_epi32(0, 0, r>=1?0:8, r>=1?0:8, r>=2?0:8, r>=2?0:8, 8, 8);
      permuted_fold_row(qt, ka, ka + 7*PW*D, idx0, out + r*8, out + (r+7)*8);
    }
    for (int r=3;r<7;r+=2){
      const float *ka = k + ((size_t)(y0+r)*PW + x0)*D;
      union_two_rows(qt, ka, ka + PW*D, out + r*8, out + (r+1)*8);
    }
  }
}

/* (b) */
AI void fold_rows(const v8 *qt, const float *k, int y0, int x0, int f, v8 *out){
  /* folds f and f + 1: slot row f is key rows (f, f + 7) of the union, lanes <= f on row f */
  const __mmask8 ma = (__mmask8)((1u << (f + 1)) - 1), mb = (__mmask8)((1u << (f + 2)) - 1);
  const float *a0 = k + ((size_t)(y0+f)*PW + x0)*D, *a7 = a0 + 7*PW*D;
  const float *b0 = a0 + PW*D, *b7 = b0 + 7*PW*D;
  v8 aa[7], ab[7];
  for(int j=0;j<7;j++) aa[j]=ab[j]=(v8){0};
  for (int d=0; d<D; d++){ const v8 qd=qt[d];
    for(int j=0;j<7;j++){
      __m256 ka = _mm256_set1_ps(a7[j*D+d]); ka = _mm256_mask_broadcastss_ps(ka, ma, _mm_load_ss(a0+j*D+d));
      __m256 kb = _mm256_set1_ps(b7[j*D+d]); kb = _mm256_mask_broadcastss_ps(kb, mb, _mm_load_ss(b0+j*D+d));
      aa[j]+=qd*(v8)ka; ab[j]+=qd*(v8)kb; } }
  for(int j=0;j<7;j++){ out[f*7+j]=aa[j]; if (f+1<7) out[(f+1)*7+j]=ab[j]; }
}
AI void fold_row1(const v8 *qt, const float *k, int y0, int x0, int f, v8 *out){
  const __mmask8 ma = (__mmask8)((1u << (f + 1)) - 1);
  const float *a0 = k + ((size_t)(y0+f)*PW + x0)*D, *a7 = a0 + 7*PW*D;
  v8 aa[7], ao[7];
  for(int j=0;j<7;j++) aa[j]=ao[j]=(v8){0};
  for (int d=0; d<D; d+=2){ const v8 qd=qt[d], qe=qt[d+1];
    for(int j=0;j<7;j++){
      __m256 ka = _mm256_set1_ps(a7[j*D+d]); ka = _mm256_mask_broadcastss_ps(ka, ma, _mm_load_ss(a0+j*D+d));
      __m256 kb = _mm256_set1_ps(a7[j*D+d+1]); kb = _mm256_mask_broadcastss_ps(kb, ma, _mm_load_ss(a0+j*D+d+1));
      aa[j]+=qd*(v8)ka; ao[j]+=qe*(v8)kb; } }
  for(int j=0;j<7;j++) out[f*7+j]=aa[j]+ao[j];
}
__attribute__((noinline)) void qk_fold(const float *q, const float *k, v8 *scores){
  v8 qt[D] __attribute__((aligned(32)));
  for (int y0=0;y0<H;y0+=8) for (int x0=0;x0<W;x0++){
    transpose_q(q,y0,x0,1,qt);
    v8 *out = scores + ((size_t)(y0/8)*W+x0)*49;
    fold_rows(qt,k,y0,x0,0,out); fold_rows(qt,k,y0,x0,2,out); fold_rows(qt,k,y0,x0,4,out); fold_row1(qt,k,y0,x0,6,out);
  }
}
int main(){
  long qn=(long)H*W*D, kn=(long)PH*PW*D;
  float *q=filled(ITEMS*qn,1), *k=filled(ITEMS*kn,2);
  v8 *sa=aligned_alloc(64,(size_t)ITEMS*(H/4)*(W/2)*80*32), *sb=aligned_alloc(64,(size_t)ITEMS*(H/8)*W*49*32);
  double best[3]={1e9,1e9,1e9};
  v8 *sc=aligned_alloc(64,(size_t)ITEMS*(H/4)*(W/2)*80*32);
  for (int rep=0;rep<15;rep++){
    double t=now(); for(int it=0;it<ITEMS;it++) qk_union(q+it*qn,k+it*kn,sa+(size_t)it*(H/4)*(W/2)*80); double t1=now(); if((t1-t)/ITEMS<best[0]) best[0]=(t1-t)/ITEMS;
    t=now(); for(int it=0;it<ITEMS;it++) qk_fold(q+it*qn,k+it*kn,sb+(size_t)it*(H/8)*W*49); t1=now(); if((t1-t)/ITEMS<best[1]) best[1]=(t1-t)/ITEMS;
    t=now(); for(int it=0;it<ITEMS;it++) qk_fold_permuted(q+it*qn,k+it*kn,sc+(size_t)it*(H/4)*(W/2)*80); t1=now(); if((t1-t)/ITEMS<best[2]) best[2]=(t1-t)/ITEMS;
  }
  double err=0;
  for (int y=0;y<H;y+=5) for (int x=0;x<W;x+=3) for (int dy=-3;dy<=3;dy++) for(int dx=-3;dx<=3;dx++){
    double ref=0; for(int d=0;d<D;d++) ref+=q[(y*W+x)*D+d]*k[((y+dy+R)*PW+x+dx+R)*D+d];
    /* (a): block (y/4, x/2), lane (y%4)*2 + x%2, union row y%4 + dy + 3, col x%2 + dx + 3 */
    float ua = sa[((size_t)(y/4)*(W/2)+x/2)*80 + (y%4+dy+3)*8 + (x%2+dx+3)][(y%4)*2+x%2];
    /* (b): block (y/8, x), lane y%8, union row u = y%8 + dy + 3, slot row u % 7 */
    int u = y%8+dy+3; float ub = sb[((size_t)(y/8)*W+x)*49 + (u%7)*7 + dx+3][y%8];
    float uc = sc[((size_t)(y/4)*(W/2)+x/2)*80 + (y%4+dy+3)*8 + (x%2+dx+3)][(y%4)*2+x%2];
    double e1=ua-ref, e2=ub-ref, e3=uc-ref; e1=e1<0?-e1:e1; e2=e2<0?-e2:e2; e3=e3<0?-e3:e3;
    if(e1>err)err=e1; if(e2>err)err=e2; if(e3>err)err=e3; }
  printf("ITEMS %d, ms per (b,h): union 4x2 (80 slots) %.3f  folded 8x1 (49 slots) %.3f (%.3f)  4x2 folded by permutes %.3f (%.3f)  max err %.1e\n",
         ITEMS, best[0]*1e3, best[1]*1e3, best[1]/best[0], best[2]*1e3, best[2]/best[0], err);
}
