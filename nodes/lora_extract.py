"""ADD Extract LoRA: a low-rank LoRA (per-layer SVD) reproducing turbo - base, saved to models/loras.

* ``check_same_architecture``  both models hold the same weights with the same shapes.
* ``extract_lora_sd``          reads both models layer by layer with their patches applied
                               (adapters/patched_weights.py) and hands the pairs to the SVD in
                               ``training.lora_extract``.
* ``ADDExtractLoRA``           the node; numbered / atomic writing is nodes/saving.py's.
"""
from __future__ import annotations

import torch

import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..core.errors import ADDError
from ..training import lora_extract
from . import saving
from .lora_match import _MODELSPEC_ARCH, _examples, _model_family
from .lora_merge import MERGE_INFO_KEY
from ..adapters import comfy_internals as internals
from ..adapters.patched_weights import effective_weights


def check_same_architecture(turbo, base, prefix="diffusion_model.") -> None:
    """Both models hold the same weights with the same shapes, checked both ways before any SVD."""
    kt, kb = internals.key_patches(turbo, prefix), internals.key_patches(base, prefix)
    only_t, only_b = sorted(set(kt) - set(kb)), sorted(set(kb) - set(kt))
    if only_t or only_b:
        side = (f"turbo_model has {len(only_t)} weights the base lacks (e.g. {_examples(only_t, 2)})" if only_t else
                f"base_model has {len(only_b)} weights the turbo model lacks (e.g. {_examples(only_b, 2)})")
        raise ADDError(f"{side}: the two models differ in architecture, so a LoRA between them would be "
                             "meaningless. Connect the base checkpoint this turbo model was made from.")
    for k in sorted(kt):
        st, sb = tuple(kt[k][0].shape), tuple(kb[k][0].shape)
        if st != sb:
            raise ADDError(f"{k}: turbo_model {st} vs base_model {sb}: the two models differ in architecture. "
                                 "Connect the base checkpoint this turbo model was made from.")


@torch.no_grad()
def extract_lora_sd(turbo, base, rank: int, prefix="diffusion_model.", dtype=torch.float16):
    """(LoRA state dict in ComfyUI-native names, per-layer relative errors, overall error).

    dW = W_turbo - W_base per weight, made low-rank by ``training.lora_extract`` (per-layer truncated
    SVD; 1-D dW stored exactly); weights are read one layer at a time with the patches applied.
    """
    check_same_architecture(turbo, base, prefix)
    base_w = dict(effective_weights(base, prefix))
    pbar = comfy.utils.ProgressBar(max(1, len(base_w)))  # one tick per weight; Cancel stops here
    pairs = ((key, wt, base_w.pop(key)) for key, wt in effective_weights(turbo, prefix))
    sd, report = lora_extract.extract_lora(pairs, rank, dtype, tick=lambda: pbar.update(1))
    return sd, report.errors, report.overall


class ADDExtractLoRA(io.ComfyNode):
    """Low-rank LoRA (per-layer SVD) reproducing turbo − base; reports the reconstruction error."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADDExtractLoRA", display_name="ADD Extract LoRA", category="ADD/lora",
            description=("Extracts a LoRA from a turbo model and its base (truncated SVD per layer at the chosen rank), "
                         "saves it to models/loras in ComfyUI-native keys (loads in ADD LoRA Merge and core LoraLoader) "
                         "and reports the relative reconstruction error, overall and for the worst layer. Files are "
                         "numbered (<prefix>_00001_.safetensors, ...): queueing again never replaces one, unless "
                         "exact_name_overwrite is on."),
            inputs=[
                io.Model.Input("turbo_model", tooltip="The fast (distilled / LoRA-merged) model."),
                io.Model.Input("base_model", tooltip="The base model the turbo model was made from (same architecture)."),
                io.Int.Input("rank", default=64, min=1, max=1024, tooltip="LoRA rank: higher = closer, bigger file."),
                saving.prefix_input("add_extracted_lora", "models/loras"),
                saving.exact_input(),
            ],
            outputs=[io.String.Output(display_name="report",
                                      tooltip="File written, rank, relative error overall and worst layers.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, turbo_model, base_model, rank, filename_prefix, exact_name_overwrite) -> io.NodeOutput:
        fam_t, fam_b = _model_family(turbo_model), _model_family(base_model)
        if fam_t != fam_b:
            raise ADDError(f"turbo_model is {fam_t[1]} but base_model is {fam_b[1]}: connect the base of the same family")
        loras = folder_paths.get_folder_paths("loras")[0]  # the first loras folder: where LoraLoader looks
        saving.check_prefix(filename_prefix, loras, exact_name_overwrite)  # before the SVD: minutes lost on a typo
        sd, errs, overall = extract_lora_sd(turbo_model, base_model, rank)
        if not sd:
            raise ADDError("the two models have identical weights: nothing to extract (connect the turbo model and its base)")
        worst = sorted(errs.items(), key=lambda kv: -kv[1])[:3]
        record = internals.model_option(turbo_model, MERGE_INFO_KEY) or {}
        # The rank actually stored: a layer narrower than the requested rank keeps its full width.
        used = max((int(v.shape[0]) for k, v in sd.items() if k.endswith(".lora_down.weight")), default=0)
        md = {"ss_network_module": "networks.lora", "ss_network_dim": str(used), "ss_network_alpha": str(used),
              "modelspec.architecture": _MODELSPEC_ARCH.get(fam_t[0], "unknown") + "/lora",
              "add.rank": str(used), "add.requested_rank": str(rank), "add.relative_error": f"{overall:.6g}",
              "add.worst_layer": f"{worst[0][0]}={worst[0][1]:.6g}" if worst else "",
              "add.sampling": record.get("sampling", "eps")}
        path = saving.save_safetensors(loras, filename_prefix, exact_name_overwrite, sd, md)
        capped = f" (requested {rank}; no layer is wider than {used})" if used < rank else ""
        report = (f"saved {path}\nrank {used}{capped}: {len(errs)} low-rank layers, "
                  f"{sum(1 for k in sd if k.endswith(('.diff', '.diff_b')))} exact 1-D diffs\n"
                  f"relative error overall: {overall:.4g}\n"
                  + "\n".join(f"worst: {k} {v:.4g}" for k, v in worst))
        return io.NodeOutput(report, ui={"text": [report]})


NODES = [ADDExtractLoRA]
