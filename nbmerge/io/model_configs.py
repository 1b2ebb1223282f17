"""Whether the models of a merge are the same architecture, by their config.json.

Tensor names, shapes and dtypes are compared by the plan; configs can still disagree where the tensors agree: two
architectures with the same tensor layout (``LlamaForCausalLM`` and ``MistralForCausalLM``), the same hidden size
split into other attention heads, a vocabulary of the same size but another tokenizer. mergekit refuses models
whose architectures differ unless ``--allow-crimes``; nbmerge compares the fields below (top level, and a
multimodal model's ``text_config``) and refuses a disagreement with both values and both models named, unless
the caller passes ``allow_config_mismatch=True`` (``--allow-config-mismatch``). A layer stack combines models of
different depths on purpose, so it leaves ``num_hidden_layers`` out; a merge that aligns vocabularies
(``tokenizer_source``) leaves ``vocab_size`` out. Models without a config.json (a single file, a state dict) are
not compared.
"""

from __future__ import annotations

from typing import Sequence

from nbmerge.errors import ModelInputError, shown
from nbmerge.io.sources import ModelSource
from nbmerge.io.untrusted import model_json

ARCHITECTURE_FIELDS = ("architectures", "model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
                       "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")


def check_configs_agree(sources: Sequence[ModelSource], ignore: Sequence[str] = ()) -> None:
    """ModelInputError naming the first field of ARCHITECTURE_FIELDS (less ``ignore``) on which two models'
    config.json files disagree, with both values and both models."""
    fields = [field for field in ARCHITECTURE_FIELDS if field not in ignore]
    seen: dict[str, tuple[object, str]] = {}
    for source in sources:
        config = model_json(source.folder, "config.json", source.label)
        if not isinstance(config, dict):
            continue
        where = f"{source.label} ({source.folder / 'config.json'})"
        text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        for field in fields:
            for key, value in ((field, config.get(field)), (f"text_config.{field}", text_config.get(field))):
                if value is None:
                    continue
                if key not in seen:
                    seen[key] = (value, where)
                elif seen[key][0] != value:
                    raise ModelInputError(
                        f"the models' configs disagree on {key}: {shown(seen[key][0])} in {seen[key][1]}, "
                        f"{shown(value)} in {where}; these are not the same architecture (mergekit refuses them "
                        f"too); pass allow_config_mismatch=True (--allow-config-mismatch) to merge them anyway")
