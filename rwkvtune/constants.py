"""Values that several layers share, each defined once here (the foundation layer: no imports).

The names of the fine-tuning modes and training methods are here, not only in the packages that
implement them (``rwkvtune.peft``, ``rwkvtune.train.methods``), so that the training configuration
(:class:`rwkvtune.models.rwkv7.config.TrainConfig`) can check and list them as plain data.
"""

# Label of a position that has no loss: torch's cross_entropy default ``ignore_index``. Every
# dataset, collate and loss writes and tests this value.
IGNORE_INDEX = -100

# Token 0 of the RWKV World vocabulary: ends each document in training data, precedes every
# prompt (an empty prompt is just this token) and stops generation.
END_OF_TEXT = 0

MODES = ("full", "lora", "state")  # --mode: rwkvtune.peft.get_mode
METHODS = ("sft", "dpo", "grpo")  # --method: rwkvtune.train.methods.method_class

# The peak learning rate of a run that sets no lr, per mode: the one table TrainConfig.resolve reads
# (and `rwkvtune train --help-all` states; the run prints which entry it used). None: the model
# config's recommended_lr, a full fine-tune's (it shrinks with size: 1e-5 at 1.5B, 1e-6 at 7.2B).
# - lora 1e-4: adapters start at zero and only their low-rank product moves, so they take ~10-100x a
#   full fine-tune's lr whatever the model's size: RWKV-LM-LoRA / RWKV-PEFT's LoRA example trains
#   lr 1e-4 at lora_r 8, lora_alpha 16 (the same alpha / r = 2 as our lora_r 16, lora_alpha 32), and
#   QLoRA (Dettmers et al. 2023) 1e-4..2e-4; examples/recipes/lora.yaml says 1e-4.
# - state 1e-2: the state is a few numbers per head that must move far from zero.
MODE_DEFAULT_LR = {"full": None, "lora": 1e-4, "state": 1e-2}
# A model trained from scratch (init scratch) in mode full: the reference trainer's pretraining lr
# (RWKV-LM's demo uses 6e-4 for its small models), not the fine-tune recommendation.
SCRATCH_LR = 6e-4

SAVE_DTYPES = ("bf16", "fp32")  # --save-dtype: dtype of the base weights in a saved model

# data_format / --data-format: each name a jsonl reader takes -> the record format it reads
# (rwkvtune.data.formats); TrainConfig.validate refuses any other before the data is read.
DATA_FORMAT_ALIASES = {
    "auto": "auto",
    "text": "text",
    "chat": "chat",
    "messages": "chat",
    "prompt_response": "prompt_response",
    "prompt": "prompt_response",
    "pr": "prompt_response",
    "alpaca": "alpaca",
    "sharegpt": "sharegpt",
}

# The frozen base's weight formats (--base-quant): rwkvtune.models.rwkv7.quant.QUANT_KINDS (a test keeps them equal).
BASE_QUANTS = ("none", "int8", "nf4")
