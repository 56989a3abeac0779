"""Greedy generation and the rank share of a list of items, for evaluation and the methods' hooks.

Generation is sharded over ranks and runs in lockstep (``synced_gpus``): under ZeRO-3 every forward
pass gathers parameters with collectives, so every rank keeps stepping until all ranks are done, and
every rank runs the same number of batches.
"""
import torch

from . import distributed


def rank_share(num_items: int) -> list:
    """This rank's item indices, padded with None to the same count on every rank: under ZeRO-3 every
    rank must run the same number of forward passes."""
    rank, world = distributed.rank(), distributed.world_size()
    mine = list(range(rank, num_items, world))
    return mine + [None] * (-(-num_items // world) - len(mine))


@torch.no_grad()
def generate(model, tokenizer, prompts: list, prompt_format: str, max_new_tokens: int, batch_size: int,
             prefills: list | None = None) -> list:
    """Greedy continuations of ``prompts`` (all ranks call this with the same list; collective).
    ``prefills[i]``, when given and not empty, is put after the formatted prompt as the start of the
    answer (a prefilling attack); the result is what the model writes after it."""
    share = rank_share(len(prompts))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs = {}
    for start in range(0, len(share), batch_size):
        indices = share[start:start + batch_size]
        # Padding slots generate for prompt 0 (to keep in step) and are not kept.
        slots = [i if i is not None else 0 for i in indices]
        texts = [prompt_format.format(prompt=prompts[i]) for i in slots]
        if prefills is not None:
            texts = [t + " " + prefills[i] if prefills[i] else t for t, i in zip(texts, slots)]
        encoded = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
        width = max(len(e) for e in encoded)
        input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                   max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                   synced_gpus=distributed.world_size() > 1)
        for row, i in enumerate(indices):
            if i is not None:
                outputs[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True).strip()
    if was_training:
        model.train()
    merged = {}
    for part in distributed.gather_objects(outputs):
        merged.update(part)
    return [merged[i] for i in range(len(prompts))]
