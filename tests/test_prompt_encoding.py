"""One owner for prompt encoding: training rollouts and evaluation hand the backend the same text and the
same special-token rule (`Template`), with and without a chat template on the tokenizer."""

import pytest
import torch

from mtp_occ.config import compose
from mtp_occ.data import PromptSampler, build_prompts
from mtp_occ.dist import DistInfo
from mtp_occ.eval.policy import make_generate_fn
from mtp_occ.eval.templates import format_prompt
from mtp_occ.policy import build_policy
from mtp_occ.rollout import HFRollout
from mtp_occ.rollout.hf import encode_prompts
from mtp_occ.train import collect_rollouts

CHAT = "{% for m in messages %}<s>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"


class Recorder(HFRollout):
    def __init__(self, model):
        super().__init__(model)
        self.seen = []

    def generate(self, tokenizer, prompts, n, sampling, **kw):
        self.seen.append((list(prompts), kw["add_special_tokens"]))
        return super().generate(tokenizer, prompts, n, sampling, **kw)


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("template", ["plain", "qwen_boxed"])
def test_training_and_evaluation_encode_a_prompt_identically(template, chat):
    cfg = compose(["regime=detach", "model.pretrain.steps=0", "algo.prompts_per_step=2", "algo.group_size=2", "algo.updates_per_step=1",
                   "rollout.max_new_tokens=2", "rollout.max_prompt_len=128", f"data.template={template}",
                   f"eval.template={template}", "eval.max_new_tokens=2", "reward.grader=exact", "wandb.mode=disabled"])
    model, tok, _ = build_policy(cfg.model, cfg.data, 0)
    if chat:
        tok.chat_template = CHAT
    prompts = build_prompts(cfg.data, cfg.data.seed)
    rec = Recorder(model)
    collect_rollouts(cfg, model, tok, prompts, PromptSampler(len(prompts), 0, False), 1, DistInfo(), rec)
    (train_texts, train_special), = rec.seen
    problem = prompts[0].problem
    make_generate_fn(model, tok, cfg.eval, cfg.rollout, seed=0, backend=rec)([format_prompt(problem, template, tok)], 1)
    (eval_texts, eval_special) = rec.seen[1]
    assert train_texts[0] == eval_texts[0] and train_special == eval_special
    ids_train = encode_prompts(tok, train_texts[:1], 128, train_special)[0]
    ids_eval = encode_prompts(tok, eval_texts, 128, eval_special)[0]
    assert torch.equal(ids_train, ids_eval)
    real = ids_train[0][ids_train[0] != tok.pad_token_id]
    assert int(real[0]) == tok.bos_token_id and int((real == tok.bos_token_id).sum()) == 1  # one BOS, never two
