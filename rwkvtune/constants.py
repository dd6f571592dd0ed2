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

# A learning rate a mode needs whatever the model recommends (TrainConfig.resolve uses it when lr is
# unset). State tuning: the state is a few numbers per head that must move far from zero.
MODE_DEFAULT_LR = {"state": 1e-2}

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
