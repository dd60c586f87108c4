"""The old home of the KV methods, kept as an alias while zipjax/generate.py and zipjax/emu3/ still import `Method`
from here: each method now lives in the file named after it (zipjax.kv.zipcache, kivi, uniform, zipvl, minicache), the
protocol and the shared checks in zipjax.kv.method, the quantized geometry in zipjax.kv.quantizing. Import them from
`zipjax.kv`. Imports: the method modules.
"""

from zipjax.kv.kivi import KIVI
from zipjax.kv.method import Method
from zipjax.kv.minicache import MiniCache
from zipjax.kv.quantizing import Geometry, QuantMethod, Ranking, Segment, geometry
from zipjax.kv.uniform import Uniform
from zipjax.kv.zipcache import ZipCache
from zipjax.kv.zipvl import ZipVL

__all__ = ["KIVI", "Geometry", "Method", "MiniCache", "QuantMethod", "Ranking", "Segment", "Uniform", "ZipCache",
           "ZipVL", "geometry"]
