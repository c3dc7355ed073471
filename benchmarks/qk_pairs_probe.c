/* Q x K^T of the window kernel's 4 x 2 block (attention_cpu_window.c) over
 * one union of ten rows of 8 keys, D = 32, rows in L1, three ways:
 *
 *   current:  the kernel's loop, one broadcast of a key element per d against
 *             the eight queries transposed ([d][8 lanes]);
 *   pairs4:   two d of a key broadcast at once (vbroadcastsd) against vectors
 *             that interleave two d of four queries, lanes {0,1,4,5} and
 *             {2,3,6,7}, so that one vhaddps per key gives the lane order
 *             back; keys in groups of 4 (8 accumulators);
 *   pairs62:  the same in groups of 6 and 2.
 *
 * Checks that the three agree, then prints nanoseconds per block for 15
 * alternating repetitions of 200,000 blocks.
 *
 *   cc -O3 -march=x86-64-v3 benchmarks/qk_pairs_probe.c -o qk_pairs_probe
 */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
#define D 32 /* head dim */
#define W 64
#define ROWS 10
#define COLS 8
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static float K[(ROWS+4)*W*D] __attribute__((aligned(64)));
static v8 qt[D], qp[D/2][2];
static v8 outA[ROWS*COLS], outB[ROWS*COLS];
__attribute__((noinline)) void qk_current(const float *k0, int shift){
  for(int r=0;r<ROWS;r++){
    const float *keys=k0+(r*W+shift)*D;
    v8 acc[COLS]; for(int j=0;j<COLS;j++) acc[j]=(v8){0};
#pragma GCC unroll 2
    for(int d=0;d<D;d++){ v8 qd=qt[d]; for(int j=0;j<COLS;j++) acc[j]+=qd*keys[j*D+d]; }
    for(int j=0;j<COLS;j++) outA[r*COLS+j]=acc[j];
  }
}
static inline void group_pairs(const float *keys, int g, v8 *out){
  /* g keys (constant) from keys, pair-d products */
  v8 a0[6], a1[6];
  for(int j=0;j<g;j++){a0[j]=(v8){0};a1[j]=(v8){0};}
#pragma GCC unroll 2
  for(int dp=0;dp<D/2;dp++){
    const v8 x=qp[dp][0], y=qp[dp][1];
    for(int j=0;j<g;j++){
      const v8 kk=(v8)_mm256_broadcast_sd((const double*)(keys+j*D+2*dp));
      a0[j]+=x*kk; a1[j]+=y*kk;
    }
  }
  for(int j=0;j<g;j++) out[j]=(v8)_mm256_hadd_ps((__m256)a0[j],(__m256)a1[j]);
}
__attribute__((noinline)) void qk_pairs4(const float *k0, int shift){
  for(int r=0;r<ROWS;r++){
    const float *keys=k0+(r*W+shift)*D;
    group_pairs(keys,4,outB+r*COLS);
    group_pairs(keys+4*D,4,outB+r*COLS+4);
  }
}
__attribute__((noinline)) void qk_pairs62(const float *k0, int shift){
  for(int r=0;r<ROWS;r++){
    const float *keys=k0+(r*W+shift)*D;
    group_pairs(keys,6,outB+r*COLS);
    group_pairs(keys+6*D,2,outB+r*COLS+6);
  }
}
int main(){
  srand(1);
  for(size_t i=0;i<sizeof K/4;i++) K[i]=rand()/(float)RAND_MAX-0.5f;
  float q[8][D]; for(int l=0;l<8;l++) for(int d=0;d<D;d++) q[l][d]=rand()/(float)RAND_MAX-0.5f;
  for(int d=0;d<D;d++) for(int l=0;l<8;l++) qt[d][l]=q[l][d];
  static const int h0[4]={0,1,4,5}, h1[4]={2,3,6,7};
  for(int dp=0;dp<D/2;dp++) for(int m=0;m<4;m++) for(int e=0;e<2;e++){ qp[dp][0][2*m+e]=q[h0[m]][2*dp+e]; qp[dp][1][2*m+e]=q[h1[m]][2*dp+e]; }
  qk_current(K,3); qk_pairs4(K,3);
  float err=0; for(int s=0;s<ROWS*COLS;s++) for(int l=0;l<8;l++){float e=outA[s][l]-outB[s][l]; if(e<0)e=-e; if(e>err)err=e;}
  qk_pairs62(K,3);
  float err2=0; for(int s=0;s<ROWS*COLS;s++) for(int l=0;l<8;l++){float e=outA[s][l]-outB[s][l]; if(e<0)e=-e; if(e>err2)err2=e;}
  printf("max err pairs4 %g pairs62 %g\n",err,err2);
  const int N = 200000;
  for (int rep = 0; rep < 15; rep++) {
    const double t0 = now();
    for (int i = 0; i < N; i++) qk_current(K, (i * 2) & 31);
    const double t1 = now();
    for (int i = 0; i < N; i++) qk_pairs4(K, (i * 2) & 31);
    const double t2 = now();
    for (int i = 0; i < N; i++) qk_pairs62(K, (i * 2) & 31);
    const double t3 = now();
    printf("ns per block: current %.0f pairs4 %.0f pairs6+2 %.0f\n", (t1 - t0) / N * 1e9,
           (t2 - t1) / N * 1e9, (t3 - t2) / N * 1e9);
  }
}
