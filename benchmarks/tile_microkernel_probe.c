/* Probe: the tiled CPU kernels' scores micro-kernel (six query rows x 16 keys,
 * 12 ymm accumulators, as in csrc/attention_cpu_tiled.c) against a 12 x 32
 * version on zmm registers, over one 64 x 64 chunk, D = 32, in L1, one thread.
 * Results in benchmarks/NOTES.md.
 *   gcc -O3 -march=x86-64-v4 -ffp-contract=fast -o tile_microkernel_probe benchmarks/tile_microkernel_probe.c */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#define TILE 64
typedef float v8 __attribute__((vector_size(32)));
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+1e-9*t.tv_nsec;}
static inline __attribute__((always_inline)) void scores_rows(const float *const *q, const float *restrict kt, float *restrict s, int D, int r0, const int R, int cols){
  for (int c0=0;c0<cols;c0+=16){ v8 acc[6][2]={{{0}}};
    for (int d=0; d<D; d++){ const v8 k0=*(const v8*)&kt[d*TILE+c0], k1=*(const v8*)&kt[d*TILE+c0+8];
      for (int r=0;r<R;r++){ const float x=q[r0+r][d]; acc[r][0]+=k0*x; acc[r][1]+=k1*x; } }
    for (int r=0;r<R;r++){ *(v8*)&s[(r0+r)*TILE+c0]=acc[r][0]; *(v8*)&s[(r0+r)*TILE+c0+8]=acc[r][1]; } } }
__attribute__((noinline)) void ymm_kernel(const float *const *q, const float *kt, float *s, int D){
  for (int r0=0;r0+6<=60;r0+=6) scores_rows(q,kt,s,D,r0,6,64);
  scores_rows(q,kt,s,D,60,4,64);
}
// zmm: 12 rows x 32 cols
__attribute__((noinline)) void zmm_kernel(const float *const *q, const float *kt, float *s, int D){
  for (int r0=0;r0<64;r0+=12){ int R = 64-r0<12?64-r0:12;
    for (int c0=0;c0<64;c0+=32){ __m512 a[12][2];
      for(int r=0;r<12;r++){a[r][0]=_mm512_setzero_ps();a[r][1]=a[r][0];}
      if (R==12) {
      for (int d=0; d<D; d++){ __m512 k0=_mm512_load_ps(&kt[d*TILE+c0]), k1=_mm512_load_ps(&kt[d*TILE+c0+16]);
        for (int r=0;r<12;r++){ __m512 x=_mm512_set1_ps(q[r0+r][d]); a[r][0]=_mm512_fmadd_ps(k0,x,a[r][0]); a[r][1]=_mm512_fmadd_ps(k1,x,a[r][1]);} }
      } else {
      for (int d=0; d<D; d++){ __m512 k0=_mm512_load_ps(&kt[d*TILE+c0]), k1=_mm512_load_ps(&kt[d*TILE+c0+16]);
        for (int r=0;r<4;r++){ __m512 x=_mm512_set1_ps(q[r0+r][d]); a[r][0]=_mm512_fmadd_ps(k0,x,a[r][0]); a[r][1]=_mm512_fmadd_ps(k1,x,a[r][1]);} }
      }
      for (int r=0;r<R;r++){ _mm512_store_ps(&s[(r0+r)*TILE+c0],a[r][0]); _mm512_store_ps(&s[(r0+r)*TILE+c0+16],a[r][1]); } } } }
int main(){ int D=32; float *qs=aligned_alloc(64,64*D*4), *kt=aligned_alloc(64,D*TILE*4), *s=aligned_alloc(64,64*64*4);
  const float *q[64]; for(int i=0;i<64*D;i++){qs[i]=rand()/(float)RAND_MAX; kt[i]=qs[i];} for(int r=0;r<64;r++) q[r]=qs+r*D;
  for (int rep=0; rep<3; rep++){
  double t=now(); for(int i=0;i<200000;i++){ ymm_kernel(q,kt,s,D); __asm__ volatile(""::"r"(s):"memory"); } double ty=(now()-t)/200000;
  t=now(); for(int i=0;i<200000;i++){ zmm_kernel(q,kt,s,D); __asm__ volatile(""::"r"(s):"memory"); } double tz=(now()-t)/200000;
  double flops=2.0*64*64*D; printf("ymm 6x16: %.0f ns %.1f GFLOP/s   zmm 12x32: %.0f ns %.1f GFLOP/s\n", ty*1e9, flops/ty/1e9, tz*1e9, flops/tz/1e9); }
}
