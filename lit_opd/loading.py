"""Loading what a module runs on: tokenizers, HF causal LMs and the checks that student and
teacher fit together (one vocabulary, enough embedding rows). Shared by the distillation, SFT and
evaluation modules and the teacher factory; every error names the YAML field it came from."""

from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_opd.checkpointing import model_shape

DType = Literal["float32", "bfloat16", "float16"]


def frozen_teacher_dtype(teacher_dtype: DType | None, dtype: DType, precision: str | None) -> DType:
    """The frozen teacher's dtype: `teacher_dtype` if set; else bfloat16 under bf16-mixed precision,
    which computes the teacher in bfloat16 anyway (a float32 copy would only double its memory);
    else the student's `dtype`."""
    if teacher_dtype is not None:
        return teacher_dtype
    return "bfloat16" if precision is not None and str(precision).startswith("bf16") else dtype


def load_tokenizer(path: str, role: str):
    """A left-padding tokenizer (pad = EOS where it has none); `role` names the field in errors."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as error:
        raise ValueError(f"model.{role}: cannot load a tokenizer from {path!r}: {error}") from error
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_same_vocabulary(student_tokenizer, teacher_tokenizer, student: str, teacher: str) -> None:
    """Student and teacher must map every token to the same id (rows of the embedding beyond the
    tokenizer's size are padding and do not count)."""
    s, t = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if s == t:
        return
    only_s, only_t = sorted(set(s) - set(t))[:5], sorted(set(t) - set(s))[:5]
    moved = sorted(k for k in set(s) & set(t) if s[k] != t[k])[:5]
    raise ValueError(
        f"teacher {teacher!r} and student {student!r} tokenizers differ "
        f"({len(s)} vs {len(t)} tokens; only in student: {only_s}; only in teacher: {only_t}; "
        f"different ids: {moved}): on-policy distillation needs one shared vocabulary"
    )


def check_top_k_fits(top_k: int, excluded: int, tokenizer, student: str, teacher: str) -> None:
    """Before any model loads: the teacher's top-K support (K ids once `excluded` special tokens are
    dropped) fits in the vocabulary, and every id it can name is a row of the student's lm_head
    (a teacher with more embedding rows than the student could name one the student has not)."""
    if top_k + excluded > len(tokenizer):
        raise ValueError(f"model.init_args.top_k: {top_k} (+ {excluded} masked special tokens) is more than the "
                         f"{len(tokenizer)} tokens of the vocabulary")
    student_shape, teacher_shape = model_shape(student), model_shape(teacher)  # None: loading the model will say why
    student_rows, teacher_rows = (shape and shape[2] for shape in (student_shape, teacher_shape))
    if student_rows is not None and teacher_rows is not None and teacher_rows > student_rows:
        raise ValueError(f"model.init_args.teacher: {teacher!r} has {teacher_rows} embedding rows, more than the "
                         f"student's {student_rows}: its top-K could name ids the student has no row for")


def load_causal_lm(path: str, dtype: DType, role: str, tokenizer=None):
    """`AutoModelForCausalLM.from_pretrained(path)` in `dtype`; with `tokenizer`, refuse a model
    whose embedding has fewer rows than the tokenizer has tokens."""
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except Exception as error:
        raise ValueError(f"model.{role}: cannot load a causal LM from {path!r}: {error}") from error
    rows = model.get_input_embeddings().weight.shape[0]
    if tokenizer is not None and rows < len(tokenizer):
        raise ValueError(f"model.{role}: {rows} embedding rows < {len(tokenizer)} tokenizer tokens")
    return model
