/* The other way round from the stencil kernel, for a 7 x 7 window: vectors
 * over D instead of over eight neighbouring queries. Keys and values stay in
 * token-major rows (D contiguous, 32-byte aligned, so every load is aligned),
 * one query at a time keeps its D in registers, eight entries' partial dot
 * products are reduced into one vector of scores by horizontal adds, and
 * P x V broadcasts each weight over a value row. The softmax is a stand-in
 * (1 + z + z^2 / 2 instead of exp), so the full-loop figure is a lower bound.
 * Synthetic 64 x 64 grid padded so that every query has all 49 keys; one
 * thread; prints cycles per useful vector FMA at 3.06 GHz, to compare with
 * benchmarks/stencil_probe.c (qkpv).
 *
 *   cc -O3 -march=x86-64-v3 benchmarks/window_dvec_probe.c -o window_dvec_probe
 *   ./window_dvec_probe 32 */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
enum { W = 64, H = 64, R = 3, S = 7, E = S * S, PADW = W + 2 * R, PADH = H + 2 * R };
static double now(void){struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec+1e-9*t.tv_nsec;}
static inline __m256 reduce8(__m256 a0,__m256 a1,__m256 a2,__m256 a3,__m256 a4,__m256 a5,__m256 a6,__m256 a7){
  /* lane i of the result = horizontal sum of a_i */
  __m256 t0=_mm256_hadd_ps(a0,a1), t1=_mm256_hadd_ps(a2,a3), t2=_mm256_hadd_ps(a4,a5), t3=_mm256_hadd_ps(a6,a7);
  __m256 u0=_mm256_hadd_ps(t0,t1), u1=_mm256_hadd_ps(t2,t3);
  /* u0 = [s0l s1l s2l s3l | s0h s1h s2h s3h], u1 likewise for 4..7 */
  __m256 lo=_mm256_permute2f128_ps(u0,u1,0x20), hi=_mm256_permute2f128_ps(u0,u1,0x31);
  return _mm256_add_ps(lo,hi);
}
int main(int argc,char**argv){
  const int D = argc>1? atoi(argv[1]) : 32;  /* multiple of 8, <= 64 */
  const int DV = D/8;
  float *K=aligned_alloc(64,(size_t)PADH*PADW*D*4), *V=aligned_alloc(64,(size_t)PADH*PADW*D*4), *Q=aligned_alloc(64,(size_t)H*W*D*4), *O=aligned_alloc(64,(size_t)H*W*D*4);
  for(long i=0;i<(long)PADH*PADW*D;i++){K[i]=0.01f*(i%7); V[i]=0.01f*(i%5);}
  for(long i=0;i<(long)H*W*D;i++) Q[i]=0.01f*(i%11);
  long entry_off[56]; int e=0;
  for(int dy=0;dy<S;dy++) for(int dx=0;dx<S;dx++) entry_off[e++]=((long)dy*PADW+dx)*D;
  for(;e<56;e++) entry_off[e]=entry_off[0];
  double best_qk=1e9,best_all=1e9;
  for(int mode=0;mode<2;mode++)
  for(int rep=0;rep<7;rep++){
    double t0=now();
    for(int y=0;y<H;y++) for(int x=0;x<W;x++){
      const float *q=Q+((long)y*W+x)*D;
      const float *kb=K+((long)y*PADW+x)*D, *vb=V+((long)y*PADW+x)*D;
      __m256 qv[8]; for(int i=0;i<DV;i++) qv[i]=_mm256_load_ps(q+8*i);
      __m256 s[7];
      for(int g=0;g<7;g++){
        __m256 acc[8];
        for(int j=0;j<8;j++){
          const float *k=kb+entry_off[8*g+j];
          __m256 a=_mm256_mul_ps(qv[0],_mm256_load_ps(k)), b=_mm256_setzero_ps();
          for(int i=1;i<DV;i+=2){ b=_mm256_fmadd_ps(qv[i],_mm256_load_ps(k+8*i),b); if(i+1<DV) a=_mm256_fmadd_ps(qv[i+1],_mm256_load_ps(k+8*i+8),a);}
          acc[j]=_mm256_add_ps(a,b);
        }
        s[g]=reduce8(acc[0],acc[1],acc[2],acc[3],acc[4],acc[5],acc[6],acc[7]);
      }
      if(mode==0){ float sink=0; for(int g=0;g<7;g++){float t[8]; _mm256_storeu_ps(t,s[g]); sink+=t[g];} O[(long)y*W+x]=sink; continue; }
      /* softmax, crude: max, exp via a few ops (stand-in cost), sum */
      __m256 m=s[0]; for(int g=1;g<7;g++) m=_mm256_max_ps(m,s[g]);
      __m256 mm=_mm256_max_ps(m,_mm256_permute2f128_ps(m,m,1)); mm=_mm256_max_ps(mm,_mm256_permute_ps(mm,0x4e)); mm=_mm256_max_ps(mm,_mm256_permute_ps(mm,0xb1));
      float p[56] __attribute__((aligned(32)));
      __m256 sum=_mm256_setzero_ps();
      for(int g=0;g<7;g++){ __m256 z=_mm256_sub_ps(s[g],mm); /* 1 + z + z^2/2 stand-in for exp */
        __m256 ez=_mm256_fmadd_ps(_mm256_fmadd_ps(z,_mm256_set1_ps(0.5f),_mm256_set1_ps(1.f)),z,_mm256_set1_ps(1.f));
        sum=_mm256_add_ps(sum,ez); _mm256_store_ps(p+8*g,ez);}
      __m256 ov[8]; for(int i=0;i<DV;i++) ov[i]=_mm256_setzero_ps();
      for(int j=0;j<E;j++){
        const float *v=vb+entry_off[j]; const __m256 w=_mm256_broadcast_ss(p+j);
        for(int i=0;i<DV;i++) ov[i]=_mm256_fmadd_ps(w,_mm256_load_ps(v+8*i),ov[i]);
      }
      float *o=O+((long)y*W+x)*D; for(int i=0;i<DV;i++) _mm256_store_ps(o+8*i,ov[i]);
    }
    double t=now()-t0;
    if(mode==0){ if(t<best_qk) best_qk=t;} else { if(t<best_all) best_all=t;}
  }
  const double fma_qk=(double)H*W*E*DV, fma_all=2*fma_qk;
  printf("D=%d: QK alone %.2f cycles per useful vector FMA; QK+softmax+PV %.2f (%.3f ms per head)\n",D,
         best_qk/fma_qk*3.06e9, best_all/fma_all*3.06e9, best_all*1e3);
  printf("%g\n",O[5]);
}
