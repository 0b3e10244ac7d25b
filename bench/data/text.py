"""Tasks as text for causal LMs (model kind `causal_lm`): prompt -> answer, trained with the LM's own loss and
scored by the likelihood of each label's answer.

- The prompt: the task's `prompt.template` (conf/task/<name>.yaml) with the row's text fields, wrapped in the
  tokenizer's chat template as a user turn when it has one (`lm.chat_template: auto`), so the answer is the
  assistant's reply; without a chat template the answer follows the prompt after a space.
- Training: prompt + answer + end-of-sequence token; `lm.loss_on: answer` masks the prompt out of the loss
  (labels -100), `all` trains on every token. This changes results, so it is a knob and part of the identity.
- Evaluation, `lm.eval_mode: loglik` (default): each example is scored against every label's answer; a label's score
  is the sum of the log-probabilities of its answer tokens after the prompt (lm-evaluation-harness's multiple-choice
  `acc`). The prediction is the best-scoring label, so the GLUE metrics are computed as for a classifier, from
  a scores array (examples x labels) that plays the logits' part (and `merged_max_abs_logit_diff` compares them).
  `eval_loss` is the gold answer's mean negative log-likelihood per answer token (nats).
- Evaluation, `lm.eval_mode: generate`: the model decodes greedily from the prompt (KV cache, at most the longest
  answer plus its end-of-sequence token) and a label is predicted only when the decoded tokens, up to the first
  end-of-sequence, are exactly that label's answer tokens. Anything else counts as wrong and is counted in
  `no_answer_fraction`. The scores array is then a match indicator (1 for the matched label), so the merged-vs-
  unmerged difference is 0 when both decode the same answers. `eval_loss` is the same teacher-forced gold NLL.
- Zero-shot: the same evaluation on the pre-trained model before anything attaches (the runner records it).

A prompt longer than `budget.max_seq_len` (with its answer) loses tokens from its middle, so the instruction at its
start and the question at its end survive; the data info counts such rows.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorForSeq2Seq

from bench import BenchError

IGNORE = -100  # label id the loss skips


@dataclass(frozen=True)
class Prompting:
    """How a task becomes text for one tokenizer."""

    template: str
    answers: tuple[str, ...]  # class id -> answer text
    chat: bool  # wrap the prompt in the tokenizer's chat template
    loss_on: str  # answer | all

    def prompt(self, tokenizer, text_a: str, text_b: str | None) -> str:
        user = self.template.format(text_a=text_a, text_b=text_b if text_b is not None else "")
        if self.chat:
            return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                 add_generation_prompt=True)
        return user

    def answer(self, k: int) -> str:
        return self.answers[k] if self.chat else " " + self.answers[k]


def prompting(task_cfg: Any, lm_cfg: Any, tokenizer, task_name: str) -> Prompting:
    """The task's prompting for this tokenizer; BenchError for a task that has no answers as text (regression)."""
    prompt = task_cfg.get("prompt")
    if not prompt or not prompt.get("answers"):
        raise BenchError(f"task '{task_name}' has no answers as text (conf/task/{task_name}.yaml `prompt`): a causal "
                         "LM cannot be scored on it; pick a classification task (e.g. task=sst2)")
    answers = tuple(str(a) for a in prompt.answers)
    if len(answers) != int(task_cfg.num_labels):
        raise BenchError(f"task '{task_name}': prompt.answers has {len(answers)} texts for {task_cfg.num_labels} "
                         "labels; give one answer per class id, in class-id order")
    if len(set(answers)) != len(answers):
        raise BenchError(f"task '{task_name}': prompt.answers {list(answers)} repeat a text; each label needs its own")
    return Prompting(str(prompt.template), answers, _use_chat(lm_cfg, tokenizer), str(lm_cfg.loss_on))


def _use_chat(lm_cfg: Any, tokenizer) -> bool:
    """Whether prompts go in the tokenizer's chat template (`lm.chat_template`: auto, true or false)."""
    chat = str(lm_cfg.chat_template)
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat == "auto" else chat == "true"
    if use_chat and not getattr(tokenizer, "chat_template", None):
        raise BenchError("lm.chat_template=true but the tokenizer has no chat template; use auto or false")
    return use_chat


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _fit(prompt: list[int], room: int) -> tuple[list[int], bool]:
    """The prompt cut to `room` tokens by dropping its middle (True when cut)."""
    if len(prompt) <= room:
        return prompt, False
    head = room // 2
    return prompt[:head] + prompt[len(prompt) - (room - head):], True


def encode(df: pd.DataFrame, tokenizer, pr: Prompting, max_seq_len: int) -> tuple[list[dict], int]:
    """(features, rows whose prompt was cut). A feature: the prompt's ids, every answer's ids and the gold label;
    `train_features` and the choice collator build sequences from them."""
    answers = [_ids(tokenizer, pr.answer(k), False) for k in range(len(pr.answers))]
    longest = max(len(a) for a in answers) + 1  # + end of sequence
    if longest >= max_seq_len:
        raise BenchError(f"budget.max_seq_len={max_seq_len} leaves no room for a prompt before the answers")
    text_b = df["text_b"].tolist() if not df["text_b"].isna().all() else [None] * len(df)
    features, cut = [], 0
    for a, b, label in zip(df["text_a"].tolist(), text_b, df["label"].tolist()):
        ids, was_cut = _fit(_ids(tokenizer, pr.prompt(tokenizer, a, b), not pr.chat), max_seq_len - longest)
        cut += was_cut
        features.append({"prompt_ids": ids, "answer_ids": answers, "label": int(label)})
    return features, cut


def train_features(features: list[dict], tokenizer, pr: Prompting) -> list[dict]:
    """Prompt + gold answer + end of sequence, with labels masked to the answer (`loss_on=answer`) or not."""
    eos = [tokenizer.eos_token_id]
    out = []
    for f in features:
        answer = f["answer_ids"][f["label"]] + eos
        ids = f["prompt_ids"] + answer
        labels = ([IGNORE] * len(f["prompt_ids"]) + answer) if pr.loss_on == "answer" else list(ids)
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return out


def train_loader(features: list[dict], tokenizer, batch_size: int, seed: int) -> DataLoader:
    """Shuffled by `seed`; right padding, padded labels ignored (transformers' seq2seq collator pads both)."""
    tokenizer.padding_side = "right"
    return DataLoader(features, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed),
                      collate_fn=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE,
                                                        return_tensors="pt"))


class ChoiceCollator:
    """A batch of examples as every (example, label) sequence: prompt + that label's answer, right-padded.
    `answer_mask` marks the answer tokens; `labels` holds the gold class ids (one per example).
    Where every answer is one token, the batch is the prompts alone, left-padded, with `answer_ids`: one forward
    pass per example gives every label's score at the last position (the same quantity, K times cheaper)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if all(len(a) == 1 for a in features[0]["answer_ids"]):
            return self._prompts_only(features)
        return self._choices(features)

    def _choices(self, features: list[dict]) -> dict[str, torch.Tensor]:
        seqs, masks = [], []
        for f in features:
            for answer in f["answer_ids"]:
                seqs.append(f["prompt_ids"] + answer)
                masks.append([0] * len(f["prompt_ids"]) + [1] * len(answer))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        answer_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
        for i, (s, m) in enumerate(zip(seqs, masks)):
            ids[i, :len(s)] = torch.tensor(s)
            attn[i, :len(s)] = 1
            answer_mask[i, :len(m)] = torch.tensor(m, dtype=torch.bool)
        return {"input_ids": ids, "attention_mask": attn, "answer_mask": answer_mask,
                "labels": torch.tensor([f["label"] for f in features]),
                "n_choices": torch.tensor(len(features[0]["answer_ids"]))}

    def _prompts_only(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids, attn = left_padded([f["prompt_ids"] for f in features], self.pad_id)
        return {"input_ids": ids, "attention_mask": attn, "answer_mask": torch.zeros_like(ids, dtype=torch.bool),
                "answer_ids": torch.tensor([a[0] for a in features[0]["answer_ids"]]),
                "labels": torch.tensor([f["label"] for f in features]), "n_choices": torch.tensor(0)}


def left_padded(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) with every sequence ending at the last position."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        attn[i, width - len(s):] = 1
    return ids, attn


class GenerateCollator(ChoiceCollator):
    """The choice batch (for the teacher-forced `eval_loss`) plus the prompts left-padded for greedy decoding
    (`gen_*`): `gen_answers` holds every label's answer tokens, padded with -100, `gen_eos` the stop token, `gen_pad`
    the padding."""

    def __init__(self, pad_id: int, eos_id: int):
        super().__init__(pad_id)
        self.eos_id = eos_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__(features)
        batch["gen_input_ids"], batch["gen_attention_mask"] = left_padded([f["prompt_ids"] for f in features],
                                                                          self.pad_id)
        answers = features[0]["answer_ids"]
        batch["gen_answers"] = torch.full((len(answers), max(len(a) for a in answers)), IGNORE, dtype=torch.long)
        for k, a in enumerate(answers):
            batch["gen_answers"][k, :len(a)] = torch.tensor(a)
        batch["gen_eos"], batch["gen_pad"] = torch.tensor(self.eos_id), torch.tensor(self.pad_id)
        return batch


def dev_loader(features: list[dict], tokenizer, batch_size: int, eval_mode: str = "loglik") -> DataLoader:
    collate = (GenerateCollator(tokenizer.pad_token_id, tokenizer.eos_token_id) if eval_mode == "generate"
               else ChoiceCollator(tokenizer.pad_token_id))
    return DataLoader(features, batch_size=batch_size, shuffle=False, collate_fn=collate)


def is_choice_batch(batch: dict) -> bool:
    return "answer_mask" in batch


def is_generate_batch(batch: dict) -> bool:
    return "gen_input_ids" in batch


def greedy_answers(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
    """Each prompt's greedy continuation (KV cache), at most the longest answer + 1 tokens, cut before the first
    end-of-sequence token."""
    prompt, eos = batch["gen_input_ids"], int(batch["gen_eos"])
    out = model.generate(input_ids=prompt, attention_mask=batch["gen_attention_mask"], do_sample=False,
                         max_new_tokens=batch["gen_answers"].shape[1] + 1, eos_token_id=eos,
                         pad_token_id=int(batch["gen_pad"]))
    return [tuple(toks[:toks.index(eos)] if eos in toks else toks) for toks in out[:, prompt.shape[1]:].tolist()]


def generate_choices(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Greedy decoding scored by exact match: examples x labels, 1 where the decoded answer (up to the first
    end-of-sequence token) is exactly that label's answer tokens. A row matching no label gets -1 at its gold label
    and 0 elsewhere, so that its prediction (the arg-max) is a wrong label: no answer counts as a wrong answer."""
    answers = [tuple(a[a != IGNORE].tolist()) for a in batch["gen_answers"]]
    decoded = greedy_answers(model, batch)
    scores = torch.zeros((len(decoded), len(answers)))
    for i, toks in enumerate(decoded):
        if toks in answers:
            scores[i, answers.index(toks)] = 1.0
        else:
            scores[i, int(batch["labels"][i])] = -1.0
    return scores.to(batch["gen_input_ids"].device)


def no_answer_fraction(scores) -> float:
    """The share of rows whose greedy answer matched no label (`generate_choices`' rows without a 1)."""
    return float((scores.max(1) < 1).mean())


def score_choices(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores: examples x labels, the sum of each answer's token log-probabilities; the gold answer's mean
    negative log-likelihood per token, per example). Methods that prepend virtual tokens (prompt tuning) return
    logits for them too: only the last `width` positions are the sequence's."""
    ids, answer_mask = batch["input_ids"], batch["answer_mask"]
    if "answer_ids" in batch:  # one-token answers: the prompts alone, left-padded (ChoiceCollator)
        # Left padding shifts a sequence's positions uniformly; rotary attention depends on relative positions only.
        last = model(input_ids=ids, attention_mask=batch["attention_mask"], logits_to_keep=1).logits[:, -1]
        scores = last.float().log_softmax(-1)[:, batch["answer_ids"]]
        return scores, -scores.gather(1, batch["labels"].unsqueeze(1)).squeeze(1)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, -ids.shape[1]:]
    # the token at position t is predicted at t - 1
    target_mask = answer_mask[:, 1:]
    picked = logits[:, :-1][target_mask].float().log_softmax(-1)
    token_lp = picked.gather(-1, ids[:, 1:][target_mask].unsqueeze(-1)).squeeze(-1)
    rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(target_mask)[target_mask]
    seq_lp = torch.zeros(ids.shape[0], device=ids.device).index_add_(0, rows, token_lp)
    n_tokens = target_mask.sum(1).clamp(min=1)
    k = int(batch["n_choices"])
    scores = seq_lp.view(-1, k)
    gold = batch["labels"]
    gold_nll = -(seq_lp / n_tokens).view(-1, k).gather(1, gold.unsqueeze(1)).squeeze(1)
    return scores, gold_nll


# ---------------------------------------------------------------- generation tasks: question -> worked solution

@dataclass(frozen=True)
class Solving:
    """How a generation task becomes text for one tokenizer: the question in the task's template (a user turn of the
    chat template when used), the worked solution as the reply; `shots` are (question, solution) examples shown
    before the question (k-shot prompting of an untrained model)."""

    template: str
    chat: bool
    loss_on: str  # answer (the solution) | all
    shots: tuple[tuple[str, str], ...] = ()

    def prompt(self, tokenizer, question: str) -> str:
        if self.chat:
            turns = []
            for q, solution in self.shots:
                turns += [{"role": "user", "content": self.template.format(text_a=q, text_b="")},
                          {"role": "assistant", "content": solution}]
            turns.append({"role": "user", "content": self.template.format(text_a=question, text_b="")})
            return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        examples = "".join(f"{self.template.format(text_a=q, text_b='')} {s}\n\n" for q, s in self.shots)
        return examples + self.template.format(text_a=question, text_b="")

    def solution(self, text: str) -> str:
        return text if self.chat else " " + text

    def shots_tokens(self, tokenizer) -> int:
        """Tokens the solved examples add in front of every question: a k-shot prompt gets this much more room than
        `max_seq_len`, so its question and solution are not cut where the zero-shot prompt's are not."""
        if not self.shots:
            return 0
        bare = dataclasses.replace(self, shots=())
        return (len(_ids(tokenizer, self.prompt(tokenizer, ""), not self.chat))
                - len(_ids(tokenizer, bare.prompt(tokenizer, ""), not self.chat)))


def solving(task_cfg: Any, lm_cfg: Any, tokenizer, shots: tuple[tuple[str, str], ...] = ()) -> Solving:
    """The generation task's prompting for this tokenizer (`lm.chat_template` as for classification tasks)."""
    prompt = task_cfg.get("prompt") or {}
    if not prompt.get("template"):
        raise BenchError(f"task '{task_cfg.name}' has no prompt.template (conf/task/{task_cfg.name}.yaml)")
    return Solving(str(prompt["template"]), _use_chat(lm_cfg, tokenizer), str(lm_cfg.loss_on), shots)


def encode_solutions(df: pd.DataFrame, tokenizer, sv: Solving, max_seq_len: int) -> tuple[list[dict], int]:
    """(features, rows cut to fit `max_seq_len`). A feature: the prompt's ids, the solution's ids with the
    end-of-sequence token, the gold final number and the question. A training sequence (prompt + solution) longer
    than `max_seq_len` loses the end of its solution (as peft's benchmark cuts its token lists); an evaluation prompt
    keeps its start and end (`_fit`)."""
    eos = [tokenizer.eos_token_id]
    features, cut = [], 0
    for question, solution, answer in zip(df["text_a"].tolist(), df["label"].tolist(), df["answer"].tolist()):
        prompt, was_cut = _fit(_ids(tokenizer, sv.prompt(tokenizer, question), not sv.chat), max_seq_len - 1)
        full = _ids(tokenizer, sv.solution(solution), False) + eos
        sol = full[:max_seq_len - len(prompt)]
        cut += was_cut or len(sol) < len(full)
        features.append({"prompt_ids": prompt, "answer_ids": [sol], "label": 0, "answer": answer,
                         "question": question})
    return features, cut


def solution_train_features(features: list[dict], sv: Solving) -> list[dict]:
    """Prompt + worked solution (+ end of sequence), labels masked to the solution (`loss_on=answer`) or not."""
    out = []
    for f in features:
        ids = f["prompt_ids"] + f["answer_ids"][0]
        labels = ([IGNORE] * len(f["prompt_ids"]) + f["answer_ids"][0]) if sv.loss_on == "answer" else list(ids)
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return out


class SolutionCollator(ChoiceCollator):
    """A batch of generation-task examples: the prompt + gold solution sequences (right-padded, `answer_mask` on the
    solution) for the teacher-forced loss, and the prompts left-padded for greedy decoding (`gen_*`), with the gold
    numbers and questions as lists (`answers`, `questions`)."""

    def __init__(self, pad_id: int, eos_id: int, max_new_tokens: int):
        super().__init__(pad_id)
        self.eos_id, self.max_new_tokens = eos_id, max_new_tokens

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        batch: dict[str, Any] = self._choices(features)
        batch["gen_input_ids"], batch["gen_attention_mask"] = left_padded([f["prompt_ids"] for f in features],
                                                                          self.pad_id)
        batch["gen_eos"], batch["gen_pad"] = torch.tensor(self.eos_id), torch.tensor(self.pad_id)
        batch["gen_max_new_tokens"] = torch.tensor(self.max_new_tokens)
        batch["answers"] = [f["answer"] for f in features]
        batch["questions"] = [f["question"] for f in features]
        return batch


def solution_loader(features: list[dict], tokenizer, batch_size: int, max_new_tokens: int) -> DataLoader:
    collate = SolutionCollator(tokenizer.pad_token_id, tokenizer.eos_token_id, max_new_tokens)
    return DataLoader(features, batch_size=batch_size, shuffle=False, collate_fn=collate)


def is_solution_batch(batch: dict) -> bool:
    return "gen_max_new_tokens" in batch


def greedy_generations(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[list[list[int]], list[bool]]:
    """Each prompt's greedy continuation with the KV cache (batched, left-padded), cut before the first end-of-sequence
    token, and whether it stopped there (False: it ran into `max_new_tokens`)."""
    prompt, eos = batch["gen_input_ids"], int(batch["gen_eos"])
    out = model.generate(input_ids=prompt, attention_mask=batch["gen_attention_mask"], do_sample=False,
                         max_new_tokens=int(batch["gen_max_new_tokens"]), eos_token_id=eos,
                         pad_token_id=int(batch["gen_pad"]))
    generated, stopped = [], []
    for toks in out[:, prompt.shape[1]:].tolist():
        stopped.append(eos in toks)
        generated.append(toks[:toks.index(eos)] if eos in toks else toks)
    return generated, stopped
