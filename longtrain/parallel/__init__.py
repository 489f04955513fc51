"""Process groups and the transforms that spread a model over them."""

from longtrain.parallel.mesh import Mesh, all_reduce_sum, init_mesh
from longtrain.parallel.parallelize import parallelize_model

__all__ = ["Mesh", "all_reduce_sum", "init_mesh", "parallelize_model"]
