"""Process groups, sequence layouts, sequence-parallel attention, and the transforms that apply them."""

from longtrain.parallel.mesh import Mesh, all_reduce_sum, init_mesh
from longtrain.parallel.parallelize import parallelize_model
from longtrain.parallel.sharding import shard_positions, shard_sequence, unshard_sequence
from longtrain.parallel.sp_attention import METHODS, sp_attention, sp_attention_with_lse

__all__ = ["METHODS", "Mesh", "all_reduce_sum", "init_mesh", "parallelize_model", "shard_positions", "shard_sequence",
           "sp_attention", "sp_attention_with_lse", "unshard_sequence"]
