/* Probe: Q x K^T of a 7 x 7 window for 16-query strips (AVX-512, one zmm of
 * queries along an image row) from a transposed, padded key panel [y][d][x],
 * one (batch, head) of 64 x 64 tokens, D = 32, cycling through 16 of them.
 * Variants: shifts by valignd from three aligned loads, unaligned loads,
 * image rows in pairs sharing each key row's shifts, and no shifts at all
 * (the FMA and load bound). Results in benchmarks/NOTES.md.
 *   gcc -O3 -march=x86-64-v4 -o strip16_probe benchmarks/strip16_probe.c */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#define H 64
#define W 64
#define D 32
#define PAD 16
#define RS (W + 2 * PAD)
#define ITEMS 16
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+1e-9*t.tv_nsec;}

// K row-major [H*W][D] -> panel [H][D][RS], zero pads
static void build_panel(const float *k, float *panel){
  for (int y=0;y<H;y++){
    float *row = panel + (size_t)y*D*RS;
    for (int d=0; d<D; d++){ memset(row + d*RS, 0, PAD*4); memset(row + d*RS + PAD + W, 0, PAD*4);}
    for (int x0=0;x0<W;x0+=16){
      // transpose 16 tokens x 32 d
      for (int d=0; d<D; d++){
        __m512 v = _mm512_i32gather_ps(_mm512_setr_epi32(0,D,2*D,3*D,4*D,5*D,6*D,7*D,8*D,9*D,10*D,11*D,12*D,13*D,14*D,15*D), k + ((size_t)y*W + x0)*D + d, 4);
        _mm512_store_ps(row + d*RS + PAD + x0, v);
      }
    }
  }
}

__attribute__((noinline)) static void qk_align(const float *qp, const float *kp, float *scores){
  for (int y=0;y<H;y++) for (int x0=0;x0<W;x0+=16){
    float *s = scores + ((size_t)y*(W/16) + x0/16)*49*16;
    for (int dy=-3; dy<=3; dy++){
      int ky=y+dy; if (ky<0||ky>=H) continue;
      __m512 a0=_mm512_setzero_ps(),a1=a0,a2=a0,a3=a0,a4=a0,a5=a0,a6=a0;
      const float *kb = kp + (size_t)ky*D*RS + PAD + x0;
      const float *qb = qp + (size_t)y*D*RS + PAD + x0;
      for (int d=0; d<D; d++){
        __m512 lo=_mm512_load_ps(kb+d*RS-16), mid=_mm512_load_ps(kb+d*RS), hi=_mm512_load_ps(kb+d*RS+16);
        __m512 q=_mm512_load_ps(qb+d*RS);
        a0=_mm512_fmadd_ps(q,_mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(mid),_mm512_castps_si512(lo),13)),a0);
        a1=_mm512_fmadd_ps(q,_mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(mid),_mm512_castps_si512(lo),14)),a1);
        a2=_mm512_fmadd_ps(q,_mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(mid),_mm512_castps_si512(lo),15)),a2);
        a3=_mm512_fmadd_ps(q,mid,a3);
        a4=_mm512_fmadd_ps(q,_mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(hi),_mm512_castps_si512(mid),1)),a4);
        a5=_mm512_fmadd_ps(q,_mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(hi),_mm512_castps_si512(mid),2)),a5);
        a6=_mm512_fmadd_ps(q,_mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(hi),_mm512_castps_si512(mid),3)),a6);
      }
      float *o = s + (dy+3)*7*16;
      _mm512_store_ps(o,a0);_mm512_store_ps(o+16,a1);_mm512_store_ps(o+32,a2);_mm512_store_ps(o+48,a3);
      _mm512_store_ps(o+64,a4);_mm512_store_ps(o+80,a5);_mm512_store_ps(o+96,a6);
    }
  }
}
__attribute__((noinline)) static void qk_unaligned(const float *qp, const float *kp, float *scores){
  for (int y=0;y<H;y++) for (int x0=0;x0<W;x0+=16){
    float *s = scores + ((size_t)y*(W/16) + x0/16)*49*16;
    for (int dy=-3; dy<=3; dy++){
      int ky=y+dy; if (ky<0||ky>=H) continue;
      __m512 a[7]; for(int j=0;j<7;j++) a[j]=_mm512_setzero_ps();
      const float *kb = kp + (size_t)ky*D*RS + PAD + x0 - 3;
      const float *qb = qp + (size_t)y*D*RS + PAD + x0;
      for (int d=0; d<D; d++){
        __m512 q=_mm512_load_ps(qb+d*RS);
        for (int j=0;j<7;j++) a[j]=_mm512_fmadd_ps(q,_mm512_loadu_ps(kb+d*RS+j),a[j]);
      }
      float *o = s + (dy+3)*7*16;
      for (int j=0;j<7;j++) _mm512_store_ps(o+16*j,a[j]);
    }
  }
}

__attribute__((noinline)) static void qk_pair(const float *qp, const float *kp, float *scores){
  for (int y=0;y<H;y+=2) for (int x0=0;x0<W;x0+=16){
    float *s0 = scores + ((size_t)y*(W/16) + x0/16)*49*16;
    float *s1 = scores + ((size_t)(y+1)*(W/16) + x0/16)*49*16;
    for (int ky=y-3; ky<=y+4; ky++){
      if (ky<0||ky>=H) continue;
      int dy0 = ky - y, dy1 = ky - y - 1;  // offsets for row y and y+1
      int use0 = dy0 <= 3, use1 = dy1 >= -3;
      __m512 a[7], b[7]; for(int j=0;j<7;j++){a[j]=_mm512_setzero_ps(); b[j]=a[j];}
      const float *kb = kp + (size_t)ky*D*RS + PAD + x0;
      const float *q0 = qp + (size_t)y*D*RS + PAD + x0, *q1 = q0 + D*RS;
      if (use0 && use1) {
      for (int d=0; d<D; d++){
        __m512i lo=_mm512_castps_si512(_mm512_load_ps(kb+d*RS-16)), mid=_mm512_castps_si512(_mm512_load_ps(kb+d*RS)), hi=_mm512_castps_si512(_mm512_load_ps(kb+d*RS+16));
        __m512 qa=_mm512_load_ps(q0+d*RS), qb=_mm512_load_ps(q1+d*RS);
        __m512 k0=_mm512_castsi512_ps(_mm512_alignr_epi32(mid,lo,13)), k1=_mm512_castsi512_ps(_mm512_alignr_epi32(mid,lo,14)), k2=_mm512_castsi512_ps(_mm512_alignr_epi32(mid,lo,15));
        __m512 k3=_mm512_castsi512_ps(mid), k4=_mm512_castsi512_ps(_mm512_alignr_epi32(hi,mid,1)), k5=_mm512_castsi512_ps(_mm512_alignr_epi32(hi,mid,2)), k6=_mm512_castsi512_ps(_mm512_alignr_epi32(hi,mid,3));
        a[0]=_mm512_fmadd_ps(qa,k0,a[0]); b[0]=_mm512_fmadd_ps(qb,k0,b[0]);
        a[1]=_mm512_fmadd_ps(qa,k1,a[1]); b[1]=_mm512_fmadd_ps(qb,k1,b[1]);
        a[2]=_mm512_fmadd_ps(qa,k2,a[2]); b[2]=_mm512_fmadd_ps(qb,k2,b[2]);
        a[3]=_mm512_fmadd_ps(qa,k3,a[3]); b[3]=_mm512_fmadd_ps(qb,k3,b[3]);
        a[4]=_mm512_fmadd_ps(qa,k4,a[4]); b[4]=_mm512_fmadd_ps(qb,k4,b[4]);
        a[5]=_mm512_fmadd_ps(qa,k5,a[5]); b[5]=_mm512_fmadd_ps(qb,k5,b[5]);
        a[6]=_mm512_fmadd_ps(qa,k6,a[6]); b[6]=_mm512_fmadd_ps(qb,k6,b[6]);
      }
      } else {
      const float *qq = use0 ? q0 : q1;
      for (int d=0; d<D; d++){
        __m512i lo=_mm512_castps_si512(_mm512_load_ps(kb+d*RS-16)), mid=_mm512_castps_si512(_mm512_load_ps(kb+d*RS)), hi=_mm512_castps_si512(_mm512_load_ps(kb+d*RS+16));
        __m512 qa=_mm512_load_ps(qq+d*RS);
        a[0]=_mm512_fmadd_ps(qa,_mm512_castsi512_ps(_mm512_alignr_epi32(mid,lo,13)),a[0]);
        a[1]=_mm512_fmadd_ps(qa,_mm512_castsi512_ps(_mm512_alignr_epi32(mid,lo,14)),a[1]);
        a[2]=_mm512_fmadd_ps(qa,_mm512_castsi512_ps(_mm512_alignr_epi32(mid,lo,15)),a[2]);
        a[3]=_mm512_fmadd_ps(qa,_mm512_castsi512_ps(mid),a[3]);
        a[4]=_mm512_fmadd_ps(qa,_mm512_castsi512_ps(_mm512_alignr_epi32(hi,mid,1)),a[4]);
        a[5]=_mm512_fmadd_ps(qa,_mm512_castsi512_ps(_mm512_alignr_epi32(hi,mid,2)),a[5]);
        a[6]=_mm512_fmadd_ps(qa,_mm512_castsi512_ps(_mm512_alignr_epi32(hi,mid,3)),a[6]);
      }
      if (!use0) for(int j=0;j<7;j++) b[j]=a[j];
      }
      if (use0) for (int j=0;j<7;j++) _mm512_store_ps(s0+((dy0+3)*7+j)*16,a[j]);
      if (use1) for (int j=0;j<7;j++) _mm512_store_ps(s1+((dy1+3)*7+j)*16,b[j]);
    }
  }
}
__attribute__((noinline)) static void qk_noshift(const float *qp, const float *kp, float *scores){
  for (int y=0;y<H;y++) for (int x0=0;x0<W;x0+=16){
    float *s = scores + ((size_t)y*(W/16) + x0/16)*49*16;
    for (int dy=-3; dy<=3; dy++){
      int ky=y+dy; if (ky<0||ky>=H) continue;
      __m512 a[7]; for(int j=0;j<7;j++) a[j]=_mm512_setzero_ps();
      const float *kb = kp + (size_t)ky*D*RS + PAD + x0;
      const float *qb = qp + (size_t)y*D*RS + PAD + x0;
      for (int d=0; d<D; d++){
        __m512 q=_mm512_load_ps(qb+d*RS), k=_mm512_load_ps(kb+d*RS);
        for (int j=0;j<7;j++) a[j]=_mm512_fmadd_ps(q,k,a[j]);
      }
      float *o = s + (dy+3)*7*16;
      for (int j=0;j<7;j++) _mm512_store_ps(o+16*j,a[j]);
    }
  }
}
int main(int argc,char**argv){
  size_t tok=(size_t)H*W*D;
  float *k = aligned_alloc(64, ITEMS*tok*4), *q = aligned_alloc(64, ITEMS*tok*4);
  float *kp = aligned_alloc(64, (size_t)ITEMS*H*D*RS*4), *qp = aligned_alloc(64,(size_t)ITEMS*H*D*RS*4);
  float *sc = aligned_alloc(64, (size_t)ITEMS*H*(W/16)*49*16*4);
  for (size_t i=0;i<ITEMS*tok;i++){k[i]=rand()/(float)RAND_MAX; q[i]=rand()/(float)RAND_MAX;}
  for (int it=0;it<ITEMS;it++){build_panel(q+it*tok,qp+(size_t)it*H*D*RS);}
  double best[5]={1e9,1e9,1e9,1e9,1e9};
  for (int rep=0;rep<15;rep++){
    double t=now();
    for (int it=0;it<ITEMS;it++) build_panel(k+it*tok,kp+(size_t)it*H*D*RS);
    double t1=now(); if ((t1-t)/ITEMS<best[0]) best[0]=(t1-t)/ITEMS;
    t=now(); for (int it=0;it<ITEMS;it++) qk_align(qp+(size_t)it*H*D*RS,kp+(size_t)it*H*D*RS,sc+(size_t)it*H*(W/16)*49*16);
    t1=now(); if ((t1-t)/ITEMS<best[1]) best[1]=(t1-t)/ITEMS;
    t=now(); for (int it=0;it<ITEMS;it++) qk_unaligned(qp+(size_t)it*H*D*RS,kp+(size_t)it*H*D*RS,sc+(size_t)it*H*(W/16)*49*16);
    t1=now(); if ((t1-t)/ITEMS<best[2]) best[2]=(t1-t)/ITEMS;
    t=now(); for (int it=0;it<ITEMS;it++) qk_pair(qp+(size_t)it*H*D*RS,kp+(size_t)it*H*D*RS,sc+(size_t)it*H*(W/16)*49*16);
    t1=now(); if ((t1-t)/ITEMS<best[3]) best[3]=(t1-t)/ITEMS;
    t=now(); for (int it=0;it<ITEMS;it++) qk_noshift(qp+(size_t)it*H*D*RS,kp+(size_t)it*H*D*RS,sc+(size_t)it*H*(W/16)*49*16);
    t1=now(); if ((t1-t)/ITEMS<best[4]) best[4]=(t1-t)/ITEMS;
  }
  printf("per (b,h) ms: panel build %.3f  qk valignd %.3f  qk unaligned %.3f  (useful FMAs at one zmm a cycle, 3.6 GHz: %.3f)\n", best[0]*1e3,best[1]*1e3,best[2]*1e3, 4096.0*49*32/16/3.6e9*1e3);
  printf("qk rows in pairs %.3f  noshift %.3f\n", best[3]*1e3, best[4]*1e3);
  return 0;
}
