"""The recipe schema: typed dataclasses used as an OmegaConf structured config.

Every field has a default and a one-line doc (the comment after it, with its unit).
`longtrain config show RECIPE` prints the resolved values; docs/config.md is generated
from these comments by `tools/config_doc.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ModelConfig:
    preset: str = "debug"  # named size: debug | tiny | 1b | llama2-7b | llama3-8b (see longtrain/models/presets.py)
    pretrained: Optional[str] = None  # HF checkpoint folder (config.json + *.safetensors) to load; overrides the preset's shape
    vocab_size: Optional[int] = None  # override the preset's vocabulary size (tokens); None keeps the preset's
    max_position_embeddings: Optional[int] = None  # override the preset's RoPE context (tokens); None keeps it
    tie_word_embeddings: Optional[bool] = None  # share embedding and LM head weights; None keeps the preset's
    num_hidden_layers: Optional[int] = None  # override the preset's depth (decoder layers; same width), e.g. for depth-truncated benchmarks; None keeps it
    dtype: str = "float32"  # parameter dtype: float32 | bfloat16 | float64 (bf16 compute comes from train.precision)
    init_std: float = 0.02  # std of the normal init of linear and embedding weights (ignored when loading pretrained)


@dataclass
class NeedleConfig:
    n_keys: int = 1  # key/value pairs hidden in each sample; one of them is asked for (1 = passkey retrieval)
    value_digits: int = 5  # digits in each hidden value
    loss_on: str = "all"  # which tokens carry loss: all (language modelling + answer) | answer (answer tokens only)


@dataclass
class KeymapConfig:
    task: int = 0  # which lookup task (0-9): selects the key -> value permutation and the tag digit
    n_keys: int = 16  # keys per task (letters a..), each mapped to a value letter by the task's permutation


@dataclass
class DataConfig:
    source: str = "needle"  # needle (synthetic retrieval task) | keymap (synthetic lookup tasks, for continual learning) | jsonl | text | memmap
    paths: list[str] = field(default_factory=list)  # input files for jsonl/text/memmap sources
    text_field: str = "text"  # jsonl field holding the document text
    memmap_dtype: str = "uint16"  # dtype of pre-tokenized memmap files: uint16 | uint32 | int32
    tokenizer: str = "byte"  # byte (built in, no downloads) or a path to a local HF tokenizer.json
    seq_len: int = 512  # tokens per training sequence
    document_mask: bool = True  # packed documents attend only to themselves (false: to the whole sequence)
    eval_fraction: float = 0.05  # fraction of packed sequences held out for evaluation (file sources)
    needle: NeedleConfig = field(default_factory=NeedleConfig)
    keymap: KeymapConfig = field(default_factory=KeymapConfig)
    num_samples: int = 100000  # synthetic samples in the training set (needle and keymap sources)
    seed: int = 1234  # data order and synthetic generation seed


@dataclass
class TrainConfig:
    output_dir: str = "runs/quickstart"  # run directory: config.yaml, metrics.jsonl, checkpoints
    steps: int = 100  # optimizer steps
    micro_batch_size: int = 1  # sequences per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 3.0e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10  # linear warmup steps
    weight_decay: float = 0.1  # AdamW weight decay (not applied to norms)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1.0e-8  # AdamW epsilon
    grad_clip: float = 1.0  # clip global grad norm to this value (0 = off)
    precision: str = "fp32"  # fp32 | bf16 (autocast to bfloat16 with fp32 master weights)
    attention_kernel: str = "auto"  # auto | math | cpu_flash | flash | cudnn (auto = fastest available)
    loss_tile_tokens: int = 4096  # tokens per tile of the tiled cross-entropy (never materialises full logits)
    eval_interval: int = 50  # evaluate every N steps (0 = only at the end)
    eval_samples: int = 16  # sequences per evaluation
    log_interval: int = 1  # print a progress line every N steps
    peak_tflops: float = 989.0  # per-device peak for MFU (TFLOP/s); 989 = H100/H200 SXM dense bf16
    seed: int = 0  # model init and dropout seed
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class SequenceParallelConfig:
    degree: int = 1  # ranks that share one sequence (consecutive ranks); must divide the number of ranks
    method: str = "ring"  # ring (K/V travel) | ring_bidir (two counter-rotating K/V rings) | token_ring (queries travel, results return) | ulysses (all-to-all of heads)
    layout: str = "zigzag"  # zigzag (causal load balance, S % 2*degree == 0) | contiguous (S % degree == 0)


@dataclass
class ParallelConfig:
    sp: SequenceParallelConfig = field(default_factory=SequenceParallelConfig)
    engine: str = "deepspeed"  # deepspeed (ZeRO) | torch (plain DDP, replicated optimizer states)
    zero_stage: int = 2  # DeepSpeed ZeRO stage: 0 none, 1 optimizer, 2 + gradients, 3 + parameters sharded
    offload_optimizer: bool = False  # DeepSpeed: optimizer states and update on the CPU (needs ZeRO >= 1)
    offload_params: bool = False  # DeepSpeed: parameters in host memory between uses (needs ZeRO-3)
    ddp_bucket_cap_mb: int = 25  # torch engine: gradient all-reduce bucket size (MiB)


@dataclass
class ActivationConfig:
    policy: str = "none"  # none (keep all) | recompute (checkpoint every layer) | swap (MEMO token-wise swapping to host) | auto (swap what the host budget holds, recompute the rest)
    alpha: str = "auto"  # swap: share of tokens whose per-token activations go to host (0..1); auto = MEMO's cost model
    host_budget_gib: float = 0.0  # host memory for swapped activations per rank (GiB); 0 = 80% of available / ranks on the node
    chunk_tokens: int = 0  # swap/auto: recompute the (1 - alpha) tokens in chunks of this many tokens (backward holds one chunk's activations); 0 = one chunk
    mlp_chunk_tokens: int = 0  # tiled MLP on the kept and recomputed layers: the MLP runs in chunks of this many tokens, each recomputed in backward (ALST); 0 = off
    keep_last_layers: int = 2  # swap/auto: the last N layers keep their activations (their backward runs first)
    layers: list[str] = field(default_factory=list)  # per layer, overriding policy: keep | recompute | swap | swap(<alpha>)
    pcie_gbps: float = 0.0  # host<->device bandwidth for the cost model (GB/s); 0 = measure at start
    layer_fwd_ms: float = 0.0  # one layer's forward time for the cost model (ms); 0 = measure at start


PLANNER_FALLBACKS = ("caching", "pool")  # memory.planner.fallback's choices
PLANNER_MIP_SOLVERS = ("auto", "highs", "cbc")  # memory.planner.mip_solver's choices (solve_plan's mip_solver)
PLANNER_REUSE_AFTER = ("free", "next_pass", "release")  # memory.planner.reuse_after's choices (plan_recorded_iteration's)


@dataclass
class PlannerConfig:
    enabled: bool = False  # serve each layer's temporaries from one region at MIP-planned offsets (CUDA: replaces the process's CUDA allocator; elsewhere a warning); `longtrain plan-memory` prints the plan
    time_limit_s: float = 60.0  # the MIP solver's time limit (seconds): in training for the whole plan of the recorded iteration, shared by its level-1 and level-2 solves (at most half of launch.timeout_s: the other ranks wait while one plans); `longtrain plan-memory` gives it to each of its two levels. The greedy plan is kept where the MIP does not beat it
    mip_solver: str = "auto"  # the MIP solver: auto (HiGHS where highspy is installed, `pip install longtrain[highs]`, else CBC) | highs | cbc. On random traces HiGHS proved 10 of 11 optima in 18 s where CBC proved 5 in 69 s (docs/perf-log.md)
    record_iteration: int = 2  # which training iteration (0-based) is recorded and planned; later ones replay it. The first allocates gradients and buffers once; under ZeRO-3 the second still differs from later ones where the model's forward starts (measured on an H200: one size miss per iteration with 1, none with 2)
    side_streams: bool = True  # also plan the requests made on side streams (ZeRO-3's parameter gathers, the swap's prefetch buffers); a request on another stream over a freed tensor's bytes waits for that tensor's stream first; false: the fallback serves them
    check: bool = False  # also count planned blocks whose lifetime differs from the plan (freed outside their layer pass, or still live at its end); overlap is refused always
    reuse_after: str = "next_pass"  # a tensor that another stream still reads when the program frees it (record_stream: NCCL's collectives, the swap's copies, ZeRO-3) gives its bytes to later requests from: next_pass (the end of the next layer pass after its free, or its release if seen sooner: a layer's swap copy overlaps the next pass) | free (the program's free; the next tensor's stream first waits for that stream: the least memory) | release (where the recorded iteration saw that stream done, as the caching allocator reuses it; the host sees it late). Where the plan's region would not fit beside what the fallback holds, free is used instead (warned), and where that does not fit either, no plan (the fallback serves, the run goes on). Measured at 128K tokens of the 8B shape (docs/memory-planner.md): on one H200 regions of 30.1 / 26.6 / 37.1 GiB and no setting measurably faster; under sp=2 on two H200s next_pass stepped 0.95-1.00x the caching allocator's time, free 1.05-1.13x (region 28.0 / 26.0 GiB per rank)
    warmup_overflow_gib: float = 16.0  # before the plan serves (the warm-up and the recorded iteration), a request the device cannot hold even after the fallback gave back its cache goes to CUDA managed memory (the driver pages it to the host: slower steps, warned with the numbers), up to this many GiB at once, so that a sequence only the plan's packing fits can be recorded and planned; replayed iterations never use it. 0: off (such a request runs out of memory, as without the plan). Measured on one H200 (docs/memory-planner.md, ninth session): with it 163,840 tokens of the 8B shape train in 33 GiB, which expandable segments alone do not (9 requests overflowed, up to 7.83 GiB at once; warm-up steps 22 and 30 s against a 12.5 s timed step)
    fallback: str = "caching"  # what serves the requests the plan does not (warm-up, weights, optimizer state, side streams): caching (torch's caching allocator in memory.allocator's mode) | pool (CUDA's cudaMallocAsync pool). Both measured on an H200: caching reserved less and stepped faster (docs/memory-planner.md)


@dataclass
class MemoryConfig:
    allocator: str = "expandable"  # CUDA caching allocator: expandable (expandable_segments, less fragmentation at long sequence) | default; a PYTORCH_CUDA_ALLOC_CONF in the environment wins
    activation: ActivationConfig = field(default_factory=ActivationConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)


@dataclass
class HFTConfig:
    seed: int = 0  # selection seed: stage i draws its half with (seed, i); recorded in metrics and checkpoints
    train_embeddings: bool = True  # the token embeddings train in every stage
    train_lm_head: bool = True  # the LM head trains in every stage (tied to the embeddings: trains if either is set)
    train_final_norm: bool = True  # the final RMSNorm trains in every stage


@dataclass
class FPFConfig:
    select: str = "topk"  # how forgetting-prone modules are chosen from their drift: topk | threshold
    top_k: int = 4  # modules selected when select=topk (modules = linear / norm / embedding layers)
    threshold: float = 1.0e-3  # select=threshold: modules whose drift (RMS parameter change) exceeds this
    replay_tokens: int = 16384  # replay buffer size (tokens): whole sequences, reservoir-sampled over all stages
    steps: int = 20  # optimizer steps of each FPF fine-tune on the replay buffer
    lr: float = 1.0e-3  # learning rate of the FPF fine-tune (AdamW, constant)
    micro_batch_size: int = 4  # replay sequences per data-parallel rank per FPF step
    k: int = 3  # kfpf only: FPF fine-tunes run k times, evenly spaced over all training steps
    seed: int = 0  # seed of the reservoir sampling and of the replay batches


@dataclass
class FinetuneConfig:
    mode: str = "full"  # full (every parameter trains) | hft (half fine-tuning) | fpf (forgetting-prone modules re-tuned on replay at the end) | kfpf (the same, k times during training)
    hft: HFTConfig = field(default_factory=HFTConfig)
    fpf: FPFConfig = field(default_factory=FPFConfig)


@dataclass
class StageConfig:
    name: str = ""  # task name in tables and logs ("" = task<i>)
    steps: int = 0  # optimizer steps of this stage (0 = train.steps)
    lr: float = 0.0  # peak learning rate of this stage, warmup and cosine restart per stage (0 = train.lr)
    data: dict[str, Any] = field(default_factory=dict)  # keys of the data section that differ in this stage, e.g. {keymap: {task: 1}}


@dataclass
class WandbConfig:
    mode: str = "offline"  # online | offline (written under the run dir, `wandb sync` later) | disabled
    project: str = "longtrain"  # W&B project
    entity: Optional[str] = None  # W&B entity (team or user); None = your default
    name: Optional[str] = None  # run name; None = the run directory's name
    group: Optional[str] = None  # run group
    tags: list[str] = field(default_factory=list)  # run tags


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig:
    interval: int = 0  # save every N steps (0 = only at the end)
    keep_last: int = 2  # checkpoints kept (older ones are deleted after a new one is complete)
    resume: Optional[str] = None  # None | auto (latest in output_dir, if any) | path to a checkpoint folder
    export_hf: bool = True  # write the final model as HF safetensors into output_dir/hf


@dataclass
class LaunchConfig:
    nproc: int = 1  # local processes when not started by torchrun (the CLI launches them itself)
    backend: str = "auto"  # process group backend: auto (nccl on cuda, gloo on cpu) | gloo | nccl
    timeout_s: int = 600  # collective timeout (seconds): a dead or hung peer fails every rank after this
    hang_timeout_s: int = 3600  # a training step running longer than this dumps every thread's stack and exits (0 = off)
    master_port: int = 0  # rendezvous port for self-launched runs (0 = pick a free one)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    stages: list[StageConfig] = field(default_factory=list)  # tasks trained in order (continual learning); empty = one stage from train and data
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # DeepSpeed config keys merged over longtrain's (yours win)
