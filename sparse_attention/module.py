class AttentionStats: pass
class EnhancedSparseAttention: pass
