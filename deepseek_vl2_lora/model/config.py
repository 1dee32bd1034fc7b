"""DeepSeek-VL2 configuration with the official defaults.

The released `config.json` files are sparse: every key they leave out takes the default of the official
`DeepseekV2Config` / `VisionEncoderConfig` / `MlpProjectorConfig` classes. Those defaults are written out here
(facts from the official `configuration_deepseek.py` and `modeling_deepseek_vl_v2.py`), so a sparse config
reads exactly as the official code reads it. `raw` keeps the file as it was, so saving writes it back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from .. import PACKAGE_DIR

# The released models' sparse config.json and processor_config.json, shipped with the package (dry runs plan with
# them; random full-size checkpoints are built from them).
RELEASED_DIR = PACKAGE_DIR / "assets" / "released"
RELEASED = ("deepseek-vl2-tiny", "deepseek-vl2-small", "deepseek-vl2")


@dataclass
class VisionConfig:
    model_name: str = "siglip_large_patch16_384"
    image_size: int = 384
    patch_size: int = 16
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    global_pool: str = "map"
    ignore_head: bool = True
    class_token: bool = False
    num_classes: int = 0


@dataclass
class ProjectorConfig:
    projector_type: str = "downsample_mlp_gelu"
    input_dim: int = 1152
    n_embed: int = 2048
    depth: int = 2
    mlp_ratio: int = 1
    downsample_ratio: int = 2


@dataclass
class LanguageConfig:
    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    ep_size: int = 1
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int | None = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "gready"  # (sic) the official default matches no branch; real configs always set it
    n_group: int | None = None
    topk_group: int | None = None
    num_experts_per_tok: int | None = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = None
    bos_token_id: int = 100000
    eos_token_id: int = 100001
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    use_mla: bool = True

    def is_moe_layer(self, i: int) -> bool:
        return self.n_routed_experts is not None and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @property
    def q_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def mha_head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class VL2Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    tile_tag: str = "2D"
    global_view_pos: str = "head"
    candidate_resolutions: list = field(default_factory=lambda: [[384, 384]])
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> VL2Config:
        def build(dc, section: dict | None, name: str):
            section = dict(section or {})
            known = {f.name for f in fields(dc)}
            # Unknown keys (model_type, junk like `lm_head: true`) are kept in `raw` only; the official code
            # ignores them too.
            kwargs = {k: v for k, v in section.items() if k in known}
            try:
                return dc(**kwargs)
            except TypeError as e:  # pragma: no cover - dataclass kwargs are filtered above
                raise ValueError(f"{source}: bad `{name}` section: {e}") from e

        for key in ("vision_config", "projector_config", "language_config"):
            if key not in raw:
                raise ValueError(f"{source}: missing `{key}`; is this a DeepSeek-VL2 checkpoint?")
        cfg = cls(
            vision=build(VisionConfig, raw["vision_config"], "vision_config"),
            projector=build(ProjectorConfig, raw["projector_config"], "projector_config"),
            language=build(LanguageConfig, raw["language_config"], "language_config"),
            tile_tag=raw.get("tile_tag", "2D"),
            global_view_pos=raw.get("global_view_pos", "head"),
            candidate_resolutions=raw.get("candidate_resolutions", [[384, 384]]),
            raw=json.loads(json.dumps(raw)),
        )
        cfg.validate(source)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> VL2Config:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json; a checkpoint directory needs one") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict:
        """The config as it was read (sparse stays sparse); built from the dataclasses if there was no file."""
        if self.raw:
            return json.loads(json.dumps(self.raw))
        return {
            "model_type": "deepseek_vl_v2",
            "tile_tag": self.tile_tag,
            "global_view_pos": self.global_view_pos,
            "candidate_resolutions": self.candidate_resolutions,
            "vision_config": {"model_type": "vision", **dataclasses.asdict(self.vision)},
            "projector_config": {"model_type": "mlp_projector", **dataclasses.asdict(self.projector)},
            "language_config": {"model_type": "deepseek_v2", **dataclasses.asdict(self.language)},
        }

    def validate(self, source: str = "config") -> None:
        lm = self.language
        problems: list[str] = []
        if self.tile_tag != "2D":
            problems.append(f"tile_tag={self.tile_tag!r}: only '2D' is supported (the official 1D path is abandoned)")
        if self.global_view_pos not in ("head", "tail"):
            problems.append(f"global_view_pos={self.global_view_pos!r}: expected 'head' or 'tail'")
        if self.projector.projector_type != "downsample_mlp_gelu":
            problems.append(f"projector_type={self.projector.projector_type!r}: only downsample_mlp_gelu is supported")
        if self.projector.n_embed != lm.hidden_size:
            problems.append(f"projector n_embed {self.projector.n_embed} != language hidden_size {lm.hidden_size}")
        if self.projector.input_dim != self.vision.width:
            problems.append(f"projector input_dim {self.projector.input_dim} != vision width {self.vision.width}")
        if lm.use_mla and not lm.kv_lora_rank:
            problems.append("use_mla is true but kv_lora_rank is not set")
        if lm.n_routed_experts is not None:
            if lm.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
                problems.append(
                    f"topk_method={lm.topk_method!r}: expected greedy, group_limited_greedy or noaux_tc "
                    "(the official default 'gready' matches no branch)"
                )
            if lm.scoring_func not in ("softmax", "sigmoid"):
                problems.append(f"scoring_func={lm.scoring_func!r}: expected softmax or sigmoid")
            if not lm.num_experts_per_tok:
                problems.append("n_routed_experts is set but num_experts_per_tok is not")
            if lm.topk_method != "greedy":
                n_group = lm.n_group or 1
                if lm.n_routed_experts % n_group:
                    problems.append(f"n_routed_experts {lm.n_routed_experts} not divisible by n_group {n_group}")
        if lm.ep_size != 1:
            problems.append(f"ep_size={lm.ep_size}: expert parallelism is not supported; use ep_size 1")
        if problems:
            raise ValueError(f"{source}: " + "; ".join(problems))
