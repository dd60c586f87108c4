"""zipjax.experts: ME-Switch (Liu et al.): many experts fine-tuned from one base served as compressed deltas.

    bank = experts.compress(base, {"docs": docs_model, "c": c_model}, bits=2, salient=0.02, calibration=ids)
    bank.save("checkpoints/stdlib-experts/bank"); bank = experts.load("checkpoints/stdlib-experts/bank", base)
    model = experts.attach(base, bank, delta_mode="dense")
    zipjax.generate(model, prompts, 64, expert=["docs", "c", None])

Modules: quantize (bit planes, quantizers, saliency), bank (the ExpertBank pytree, sites, byte accounting),
compress, bankfile and store (write / read a bank folder), delta (the mixed-batch delta term: dense, grouped,
kernel), serve (attach, ExpertModel, the ids of generate), fingerprint (the base check); domains, finetune and
router build and route the experts themselves.
"""

from zipjax.experts.bank import ExpertBank, LinearDelta, bytes_per_expert
from zipjax.experts.compress import compress
from zipjax.experts.delta import DELTA_MODES, ExpertInputs
from zipjax.experts.fingerprint import fingerprint
from zipjax.experts.serve import ExpertModel, attach
from zipjax.experts.store import load, save

__all__ = ["DELTA_MODES", "ExpertBank", "ExpertInputs", "ExpertModel", "LinearDelta", "attach",
           "bytes_per_expert", "compress", "fingerprint", "load", "save"]
