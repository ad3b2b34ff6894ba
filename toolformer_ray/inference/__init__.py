"""Tool-aware decoding (paper, section 4.2).

    decoder.py   ToolDecoder: the decoding loop, one session per `generate` call
    calls.py     a row's calls followed on its decoded text (Phase), transcripts, the tool-name mask
    kv.py        the KV cache of the rows decoding together
    run.py       `toolformer-ray infer`: tools and decoder from a config

Tool calls run through tools/executor.py, the executor the data job uses.
"""
from toolformer_ray.inference.calls import RAN, CallRecord, Transcript
from toolformer_ray.inference.decoder import MODES, ToolDecoder
from toolformer_ray.inference.run import (decoder_from_config, load_tools, run_infer,
                                          set_torch_threads)

__all__ = ["MODES", "RAN", "CallRecord", "ToolDecoder", "Transcript", "decoder_from_config",
           "load_tools", "run_infer", "set_torch_threads"]
