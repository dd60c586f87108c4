"""zipjax.experts: ME-Switch (Liu et al.): many experts fine-tuned from one base served as compressed deltas.

    bank = experts.compress(base, {"docs": docs_model, "c": c_model}, bits=2, salient=0.02, calibration=ids)
    bank.save("checkpoints/stdlib-experts/bank"); bank = experts.load("checkpoints/stdlib-experts/bank", base)
    model = experts.attach(base, bank)   # kernel=None: the Pallas kernel on TPU/GPU; path="dense" otherwise
    zipjax.generate(model, prompts, 64, expert=["docs", "c", None])

Modules: quantize (bit planes, quantizers, saliency), bank (the ExpertBank pytree, sites, byte accounting),
compress, bankfile and store (write / read a bank folder), delta (the mixed-batch delta term: dense, grouped,
kernel; `ExpertDeltas`, the model's zipjax.deltas.WeightDeltas), serve (attach, the `Experts` / `MergedExperts`
sources a Model carries in `model.deltas`), fingerprint (the base check), forward (the cache-less forward with plain
causal attention) and router (expert="auto"). Making experts (text domains, fine-tuning, training the router) is
harness code: zipjax.harness. The model and generate import nothing of this package: attach gives the base Model a
delta source, and the transformer calls the deltas through the zipjax.deltas contract.
"""

from zipjax.experts.bank import ExpertBank, LinearDelta, bytes_per_expert
from zipjax.experts.compress import compress
from zipjax.experts.delta import PATHS, ExpertDeltas
from zipjax.experts.fingerprint import fingerprint
from zipjax.experts.serve import DELTA_MODES, Experts, MergedExperts, attach
from zipjax.experts.store import load, save

__all__ = ["DELTA_MODES", "PATHS", "ExpertBank", "ExpertDeltas", "Experts", "LinearDelta", "MergedExperts", "attach",
           "bytes_per_expert", "compress", "fingerprint", "load", "save"]
