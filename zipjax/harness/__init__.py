"""zipjax.harness: the code that builds the shipped fixtures and measures the library, kept out of the library.

The library (every other module of zipjax, the kernels and the converters) never imports this package; it imports
the library. The `zipjax experts router` command loads router_training inside its run function, the only use at
run time (tests/test_structure.py holds both rules).

Modules, none imported here (each loads what it names):
- text_domains: offline text domains every Python installation ships (prose, C headers, test code), split by hash;
- finetune: full fine-tuning of an expert, held-out perplexity, the float16 expert-delta files (`load_experts`);
- router_training: training the expert="auto" router's head; oracle / perplexity / random routing to compare with;
- digits_quality: the digit classifier and Fréchet distance that score the ZipAR decoders' images;
- kv_analysis: the per-layer queries, keys and values of a prompt, for saliency studies.
"""
