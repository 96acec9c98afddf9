#!/usr/bin/env python3
"""Checks the index arithmetic of the SIMT attention kernels without a GPU.

A float64 port of kernels/attention_fwd.cu (forward, split-KV partials and their merge) and
kernels/attention_bwd.cu (D = rowsum(dO*O), dK/dV per key tile over the GQA group, dQ per
query tile), over flat buffers with the kernels' own offset formulas, masks, tile-skip and
early-exit conditions; compared with a naive float64 reference written from the contract
(CASES.md), gradients by hand. Outputs start as NaN, so an element no block writes fails.
Cases: causal with Sq > Sk (empty rows), windows, softcap, ALiBi, broadcast bias with -inf
entries, GQA/MQA, cu_seqlens with empty pieces, split-KV over several chunks.

Only index mistakes show (it runs in float64); it is a hand port, so a change to a kernel's
indexing must be mirrored here. Written during a read-through review (no device lent).
Needs numpy:  PY=$(bash ../shared/anchors/setup.sh); $PY scripts/emulate-attention-simt.py
"""
import numpy as np, math, random
NEG=-math.inf
class Rules:
    def __init__(s, causal, wl, wr, softcap, slopes, bias, bb, bh, len_q, len_k):
        s.causal, s.wl, s.wr, s.softcap, s.slopes, s.bias, s.bb, s.bh, s.len_q, s.len_k = causal, wl, wr, softcap, slopes, bias, bb, bh, len_q, len_k
    def visible(s, g, i):
        diag = i + g['k_len'] - g['q_len']
        h = g['k_len']; l = 0
        if s.causal: h = min(h, diag+1)
        if s.wr >= 0: h = min(h, diag + s.wr + 1)
        if s.wl >= 0: l = max(l, diag - s.wl)
        return (0,0) if l >= h else (l,h)
    def union(s, g, r0, r1):
        lo, hi = 0x7fffffff, 0
        for i in range(r0, r1):
            a,b = s.visible(g,i)
            if a<b: lo=min(lo,a); hi=max(hi,b)
        if lo>=hi: lo=hi=0
        return lo,hi
    def apply(s, x, g, i, h, j):
        capd = 1.0
        if s.softcap != 0:
            t = math.tanh(x/s.softcap); x = s.softcap*t; capd = 1-t*t
        if s.slopes is not None:
            dist = i + g['k_len'] - g['q_len'] - j
            x -= s.slopes[h]*abs(dist)
        if s.bias is not None:
            bb = 0 if s.bb==1 else g['batch']; hb = 0 if s.bh==1 else h
            x += s.bias[((bb*s.bh+hb)*s.len_q + g['q_start']+i)*s.len_k + g['k_start']+j]
        return x, capd

def segment(s, cu_q, cu_k, len_q, len_k):
    if cu_q is not None:
        return dict(batch=0, q_start=cu_q[s], q_len=cu_q[s+1]-cu_q[s], k_start=cu_k[s], k_len=cu_k[s+1]-cu_k[s])
    return dict(batch=s, q_start=0, q_len=len_q, k_start=0, k_len=len_k)

def fwd(q,k,v,rules,cu_q,cu_k,o,lse,part_o,part_ml,batch,hq,hk,d,dv,scale,n_chunks,grid,ROWS=16,WARPS=4,BK=8,DMAX=None,CHUNK=512):
    R = ROWS//WARPS
    for bz in range(grid[2]):
      for by in range(grid[1]):
        for bx in range(grid[0]):
          tile, chunk = bx//n_chunks, bx%n_chunks
          h = by; h_kv = h//(hq//hk)
          g = segment(bz, cu_q, cu_k, rules.len_q, rules.len_k)
          row0 = tile*ROWS
          if row0 >= g['q_len']: continue
          sq = np.zeros((ROWS, DMAX))
          for r in range(ROWS):
            i=row0+r
            for c in range(DMAX):
              if i<g['q_len'] and c<d: sq[r,c]=q[(((g['batch']*rules.len_q+g['q_start']+i)*hq+h)*d+c)]*scale
          blo,bhi = rules.union(g,row0,min(row0+ROWS,g['q_len']))
          if n_chunks>1: blo=max(blo,chunk*CHUNK); bhi=min(bhi,(chunk+1)*CHUNK)
          for warp in range(WARPS):
            for r in range(R):
              i = row0+warp*R+r
              lo,hi = rules.visible(g,i) if i<g['q_len'] else (0,0)
              m=NEG; lsum=np.zeros(32); acc=np.zeros(DMAX)
              for j0 in range(blo,bhi,BK):
                sk=np.zeros((BK,DMAX)); sv=np.zeros((BK,DMAX))
                for j in range(BK):
                  key=j0+j
                  for c in range(DMAX):
                    if key<bhi and c<d: sk[j,c]=k[(((g['batch']*rules.len_k+g['k_start']+key)*hk+h_kv)*d+c)]
                    if key<bhi and c<dv: sv[j,c]=v[(((g['batch']*rules.len_k+g['k_start']+key)*hk+h_kv)*dv+c)]
                s=np.full(32,NEG)
                for lane in range(32):
                  key=j0+lane
                  if lane<BK and key<bhi and lo<=key<hi:
                    s[lane]=rules.apply(float(sq[warp*R+r]@sk[lane]),g,i,h,key)[0]
                m_new=max(m,s.max())
                if m_new==NEG: p=np.zeros(32); corr=1.0
                else: corr=math.exp(m-m_new) if m!=NEG else 0.0; p=np.exp(s-m_new)
                m=m_new; lsum=lsum*corr+p; acc*=corr
                for jj in range(BK): acc+=p[jj]*sv[jj]
              if i>=g['q_len']: continue
              l=lsum.sum()
              row=g['batch']*rules.len_q+g['q_start']+i
              if n_chunks>1:
                at=(chunk*batch*rules.len_q+row)*hq+h
                for c in range(dv): part_o[at*dv+c]=acc[c]
                part_ml[at*2]=m; part_ml[at*2+1]=l
              else:
                inv=1/l if l>0 else 0
                for c in range(dv): o[(row*hq+h)*dv+c]=acc[c]*inv
                lse[(g['batch']*hq+h)*rules.len_q+g['q_start']+i]=m+math.log(l) if l>0 else NEG

def merge(part_o,part_ml,o,lse,batch,len_q,hq,dv,n_chunks):
    rows=batch*len_q
    for row in range(rows):
      for h in range(hq):
        m=NEG
        for c in range(n_chunks): m=max(m,part_ml[((c*rows+row)*hq+h)*2])
        l=0.0
        if m!=NEG:
          for c in range(n_chunks):
            at=(c*rows+row)*hq+h; mc=part_ml[at*2]
            if mc!=NEG: l+=part_ml[at*2+1]*math.exp(mc-m)
        inv=1/l if l>0 else 0
        for col in range(dv):
          x=0.0
          if l>0:
            for c in range(n_chunks):
              at=(c*rows+row)*hq+h; mc=part_ml[at*2]
              if mc!=NEG: x+=part_o[at*dv+col]*math.exp(mc-m)
          o[(row*hq+h)*dv+col]=x*inv
        b,i=row//len_q,row%len_q
        lse[(b*hq+h)*len_q+i]=m+math.log(l) if l>0 else NEG

def bwd(q,k,v,do,o,lse,rules,cu_q,cu_k,B,Sq,Sk,hq,hk,d,dv,scale,nseq,max_q,max_k,KEYS=8,ROWS=8,QT=4,BKq=4):
    pairs=B*Sq*hq; dsum=np.zeros(pairs)
    for pair in range(pairs):
      x=sum(do[pair*dv+c]*o[pair*dv+c] for c in range(dv))
      h=pair%hq; row=pair//hq; b=row//Sq; i=row%Sq
      dsum[(b*hq+h)*Sq+i]=x
    dk=np.full(B*Sk*hk*d, np.nan); dvo=np.full(B*Sk*hk*dv, np.nan); dq=np.full(B*Sq*hq*d, np.nan)
    group=hq//hk
    for bz in range(nseq):
      g=segment(bz,cu_q,cu_k,Sq,Sk)
      for h_kv in range(hk):
        for bx in range(-(-max_k//KEYS)):
          key0=bx*KEYS
          if key0>=g['k_len']: continue
          key_end=min(key0+KEYS,g['k_len'])
          for key in range(key0,key_end):
            row=((g['batch']*Sk+g['k_start']+key)*hk+h_kv)
            kr=np.array([k[row*d+c] for c in range(d)]); vr=np.array([v[row*dv+c] for c in range(dv)])
            dkr=np.zeros(d); dvr=np.zeros(dv)
            for h in range(h_kv*group,(h_kv+1)*group):
              for r0 in range(0,g['q_len'],QT):
                re=min(r0+QT,g['q_len']); lo,hi=rules.union(g,r0,re)
                if lo>=hi or hi<=key0 or lo>=key_end: continue
                for i in range(r0,re):
                  at=(g['batch']*hq+h)*Sq+g['q_start']+i
                  l=lse[at]
                  if l==NEG: continue
                  vlo,vhi=rules.visible(g,i)
                  if key<vlo or key>=vhi: continue
                  qrow=((g['batch']*Sq+g['q_start']+i)*hq+h)
                  qs=np.array([q[qrow*d+c] for c in range(d)])*scale
                  dos=np.array([do[qrow*dv+c] for c in range(dv)])
                  s,capd=rules.apply(float(qs@kr),g,i,h,key)
                  if s==NEG: continue
                  p=math.exp(s-l); dp=float(dos@vr); ds=p*(dp-dsum[at])*capd
                  dvr+=p*dos; dkr+=ds*qs
            for c in range(d): dk[row*d+c]=dkr[c]
            for c in range(dv): dvo[row*dv+c]=dvr[c]
      for h in range(hq):
        h_kv=h//(hq//hk)
        for bx in range(-(-max_q//ROWS)):
          row0=bx*ROWS
          if row0>=g['q_len']: continue
          bl,bh=rules.union(g,row0,min(row0+ROWS,g['q_len']))
          for i in range(row0,min(row0+ROWS,g['q_len'])):
            qrow=((g['batch']*Sq+g['q_start']+i)*hq+h)
            qs=np.array([q[qrow*d+c] for c in range(d)])*scale
            dos=np.array([do[qrow*dv+c] for c in range(dv)])
            at=(g['batch']*hq+h)*Sq+g['q_start']+i
            l=lse[at]; lo,hi=rules.visible(g,i); dqr=np.zeros(d)
            for key in range(bl,bh):
              if key<lo or key>=hi or l==NEG: continue
              krow=((g['batch']*Sk+g['k_start']+key)*hk+h_kv)
              ks=np.array([k[krow*d+c] for c in range(d)]); vs=np.array([v[krow*dv+c] for c in range(dv)])
              s,capd=rules.apply(float(qs@ks),g,i,h,key)
              if s==NEG: continue
              p=math.exp(s-l); dp=float(dos@vs); ds=p*(dp-dsum[at])*capd
              dqr+=ds*ks
            for c in range(d): dq[qrow*d+c]=dqr[c]*scale
    return dq,dk,dvo

# ---- naive reference per contract (autograd by hand) ----
def reference(q,k,v,do,B,Sq,Sk,hq,hk,d,dv,causal,wl,wr,softcap,scale,slopes,bias,bb,bh,cu):
    Q=q.reshape(B,Sq,hq,d); K=k.reshape(B,Sk,hk,d); V=v.reshape(B,Sk,hk,dv); DO=do.reshape(B,Sq,hq,dv)
    O=np.zeros((B,Sq,hq,dv)); L=np.full((B,hq,Sq),NEG); dQ=np.zeros_like(Q); dK=np.zeros_like(K); dV=np.zeros_like(V)
    segs=[(0,cu[0][n],cu[0][n+1]-cu[0][n],cu[1][n],cu[1][n+1]-cu[1][n]) for n in range(len(cu[0])-1)] if cu else [(b,0,Sq,0,Sk) for b in range(B)]
    Bias=None if bias is None else bias.reshape(bb,bh,Sq,Sk)
    for (b,qs,ql,ks,kl) in segs:
      for h in range(hq):
        hkv=h//(hq//hk)
        for i in range(ql):
          raw=np.array([scale*Q[b,qs+i,h]@K[b,ks+j,hkv] for j in range(kl)])
          sc=raw.copy(); capd=np.ones(kl)
          if softcap: t=np.tanh(raw/softcap); sc=softcap*t; capd=1-t*t
          if slopes is not None: sc=sc-slopes[h]*np.abs(i+kl-ql-np.arange(kl))
          if Bias is not None: sc=sc+Bias[0 if bb==1 else b,0 if bh==1 else h,qs+i,ks:ks+kl]
          j=np.arange(kl); diag=i+kl-ql; vis=np.ones(kl,bool)
          if causal: vis&=j<=diag
          if wl>=0: vis&=j>=diag-wl
          if wr>=0: vis&=j<=diag+wr
          sc=np.where(vis,sc,NEG)
          if kl==0 or np.all(sc==NEG): continue
          mx=sc.max(); P=np.exp(sc-mx); l=P.sum(); P/=l
          O[b,qs+i,h]=P@V[b,ks:ks+kl,hkv]; L[b,h,qs+i]=mx+math.log(l)
          dP=np.array([DO[b,qs+i,h]@V[b,ks+jj,hkv] for jj in range(kl)])
          Dd=DO[b,qs+i,h]@O[b,qs+i,h]
          dS=P*(dP-Dd)*capd
          dV[b,ks:ks+kl,hkv]+=np.outer(P,DO[b,qs+i,h])
          dQ[b,qs+i,h]+=scale*(dS@K[b,ks:ks+kl,hkv])
          dK[b,ks:ks+kl,hkv]+=scale*np.outer(dS,Q[b,qs+i,h])
    return O.ravel(),L.ravel(),dQ.ravel(),dK.ravel(),dV.ravel()

def run(B,Sq,Sk,hq,hk,d,dv,causal=0,wl=-1,wr=-1,softcap=0.0,alibi=False,bias=None,cu=None,n_chunks=1,CHUNK=512,DMAX=32,seed=0):
    rng=np.random.default_rng(seed)
    q=rng.standard_normal(B*Sq*hq*d); k=rng.standard_normal(B*Sk*hk*d); v=rng.standard_normal(B*Sk*hk*dv); do=rng.standard_normal(B*Sq*hq*dv)
    scale=1/math.sqrt(d)
    slopes=rng.random(hq) if alibi else None
    bb=bh=1; bias_arr=None
    if bias: bb,bh=bias; bias_arr=rng.standard_normal(bb*bh*Sq*Sk); bias_arr[rng.random(bias_arr.size)<0.1]=NEG
    rules=Rules(causal,wl,wr,softcap,slopes,bias_arr,bb,bh,Sq,Sk)
    if cu: cu_q,cu_k=cu; nseq=len(cu_q)-1; maxq=max(cu_q[n+1]-cu_q[n] for n in range(nseq)); maxk=max(cu_k[n+1]-cu_k[n] for n in range(nseq))
    else: cu_q=cu_k=None; nseq=B; maxq=Sq; maxk=Sk
    o=np.full(B*Sq*hq*dv,np.nan); lse=np.full(B*hq*Sq,np.nan)
    tiles=-(-maxq//16)
    if n_chunks>1:
        po=np.full(n_chunks*B*Sq*hq*dv,np.nan); pm=np.full(n_chunks*B*Sq*hq*2,np.nan)
        fwd(q,k,v,rules,cu_q,cu_k,o,lse,po,pm,B,hq,hk,d,dv,scale,n_chunks,(tiles*n_chunks,hq,nseq),DMAX=DMAX,CHUNK=CHUNK)
        merge(po,pm,o,lse,B,Sq,hq,dv,n_chunks)
    else:
        fwd(q,k,v,rules,cu_q,cu_k,o,lse,None,None,B,hq,hk,d,dv,scale,1,(tiles,hq,nseq),DMAX=DMAX)
    O,L,dQ,dK,dV=reference(q,k,v,do,B,Sq,Sk,hq,hk,d,dv,causal,wl,wr,softcap,scale,slopes,bias_arr,bb,bh,(cu_q,cu_k) if cu else None)
    assert not np.isnan(o).any() and not np.isnan(lse).any(), "unwritten output"
    assert np.allclose(o,O,atol=1e-10), np.abs(o-O).max()
    assert np.array_equal(np.isinf(lse),np.isinf(L)) and np.allclose(lse[~np.isinf(L)],L[~np.isinf(L)])
    dq,dk,dvv=bwd(q,k,v,do,O,L,rules,cu_q,cu_k,B,Sq,Sk,hq,hk,d,dv,scale,nseq,maxq,maxk)
    for a,b_,n in ((dq,dQ,'dq'),(dk,dK,'dk'),(dvv,dV,'dv')):
        assert not np.isnan(a).any(), n+" unwritten"
        assert np.allclose(a,b_,atol=1e-9), (n,np.abs(a-b_).max())
    print("ok",B,Sq,Sk,hq,hk,d,dv,causal,wl,wr,softcap,alibi,bias,cu,n_chunks)

run(2,5,3,2,1,3,4,causal=1)
run(1,17,23,4,2,5,3,wl=3,wr=1,softcap=2.0,alibi=True,bias=(1,4))
run(2,9,11,2,2,4,4,bias=(2,1),causal=1)

run(1,23,23,2,1,3,2,cu=([0,5,9,20,20,23],[0,7,8,21,23,23]),causal=1,alibi=True,bias=(1,2))
run(1,23,23,4,2,3,2,cu=([0,5,9,20,20,23],[0,7,8,21,23,23]),wl=2,wr=0,softcap=3.0)
run(2,3,30,4,2,3,3,n_chunks=8,CHUNK=4,causal=1,wl=11)
run(1,4,25,2,2,3,2,cu=([0,1,1,4],[0,10,18,25]),n_chunks=3,CHUNK=4,alibi=True,bias=(1,2))
run(1,40,12,2,1,3,2,causal=1,wl=0,wr=0)
