import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from torch_mltp.integrations.transformers import MLTPTrainer

config = BertConfig(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=100
)  # a tiny BERT, built from its config
data = [{"input_ids": ids, "labels": int(ids[0] < 50)} for ids in torch.randint(0, 100, (64, 16))]
args = TrainingArguments(
    "mltp-bert", max_steps=4, per_device_train_batch_size=16, logging_steps=1, report_to="none"
)
trainer = MLTPTrainer(
    model=BertForSequenceClassification(config),
    args=args,
    train_dataset=data,
    mltp=dict(mode="fo", eta=1.0, alpha_init=(1e-3, 1e-3)),
)
trainer.train()
