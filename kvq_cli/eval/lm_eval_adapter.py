"""lm-evaluation-harness adapter: score any lm-eval task with a kvq KV policy.

lm-eval has no plugin entry point for models, so this module registers the model name
`kvq` and then runs lm-eval's own command line:

    kvq-lm-eval --model kvq --model_args kv=q4,ctx=2048 --tasks arc_easy --limit 50
    python -m kvq_cli.eval.lm_eval_adapter --model kvq --model_args model=PATH.gguf,kv=adaptive ...

From Python: `lm_eval.simple_evaluate(model=KvqLM(kv="q4"), tasks=[...])`.
model_args: model (registry alias, hub id or .gguf path; default the embedded model),
kv (any `--kv` policy; default adaptive@3.5, its controller found as `kvq chat` finds it), kv_bits,
kv_window (default 0: lm-eval's items are short, and a window would hold most of their rows at
its bits, above the policy's budget), ctx (context tokens), threads.
Needs the optional extra: pip install 'kvq-cli[lm-eval]'.
"""
from __future__ import annotations

import sys

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from kvq_cli.eval.scoring import Scorer
from kvq_cli.runtime.engine import Engine
from kvq_cli.runtime.kv import DEFAULT_KV, KvqOptions, parse_kv, require_online


def _opt(value, cast):
    return None if value in (None, "", "none", "None") else cast(value)


@register_model("kvq")
class KvqLM(LM):
    """lm-eval LM over one kvq engine (batch size 1; a context is prefilled once per item)."""

    def __init__(self, model: str | None = None, kv: str = DEFAULT_KV, kv_bits=None, kv_window=0,
                 ctx: int = 2048, threads=None, **kwargs):
        super().__init__()
        from kvq_cli.models.registry import model_ref, resolve

        policy = parse_kv(kv)
        require_online([policy])   # oracle@B needs each item's endings in advance (kvq eval)
        opts = KvqOptions(window=_opt(kv_window, int), budget_bits=_opt(kv_bits, float))
        self.engine = Engine(model_ref(resolve(model), [policy], opts), kv=policy, n_ctx=int(ctx), n_batch=int(ctx),
                             n_threads=_opt(threads, int), kvq=opts)
        self.scorer = Scorer(self.engine)
        self.eot = self.engine.llm.token_eos()

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), greedy) per request; same-context requests reuse the prefill."""
        from tqdm import tqdm

        args = [r.args for r in requests]
        order = sorted(range(len(args)), key=lambda i: args[i][0])  # group choices of an item
        out: list[tuple[float, bool] | None] = [None] * len(args)
        for i in tqdm(order, disable=disable_tqdm, desc="kvq loglikelihood"):
            context, continuation = args[i][0], args[i][1]
            if context == "":
                cont = self.engine.tokenize(continuation)
                out[i] = self.scorer.score([self.eot], cont)
            else:
                out[i] = self.scorer.loglikelihood(context, continuation)
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in disjoint windows of the context (lm-eval's rolling windows)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        from tqdm import tqdm

        out = []
        for r in tqdm(requests, disable=disable_tqdm, desc="kvq rolling"):
            tokens = self.engine.tokenize(r.args[0])
            total = 0.0
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    tokens, prefix_token=self.eot, max_seq_len=self.engine.n_ctx, context_len=1)):
                total += self.scorer.score(list(ctx), list(cont))[0]
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation until a stop string, EOS or max_gen_toks."""
        import llama_cpp
        from tqdm import tqdm

        vocab = llama_cpp.llama_model_get_vocab(self.engine.llm.model)
        out = []
        for r in tqdm(requests, disable=disable_tqdm, desc="kvq generate"):
            context, kwargs = r.args[0], dict(r.args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            ctx = self.engine.tokenize(context) or [self.eot]
            ctx = ctx[-(self.engine.n_ctx - max_new):] if len(ctx) + max_new > self.engine.n_ctx else ctx
            logits = self.engine.decode(ctx, 0, logits_from=len(ctx) - 1)[0]
            gen: list[int] = []
            text = ""
            while len(gen) < max_new:
                tok = int(logits.argmax())
                if tok == self.eot or llama_cpp.llama_vocab_is_eog(vocab, tok):
                    break
                gen.append(tok)
                text = self.engine.detokenize(gen)
                if any(s in text for s in until):
                    break
                logits = self.engine.decode([tok], len(ctx) + len(gen) - 1, logits_from=0)[0]
            for s in until:
                text = text.split(s)[0]
            out.append(text)
            self.scorer.forget()  # the cache no longer holds a scored context
        return out


def main() -> None:
    """lm-eval's command line with the `kvq` model registered; kvq's errors are one line, as in `kvq`."""
    import os

    from lm_eval.__main__ import cli_evaluate

    from kvq_cli.errors import KvqError

    try:
        sys.exit(cli_evaluate())
    except KvqError as e:
        if os.environ.get("KVQ_DEBUG"):
            raise
        print(f"kvq-lm-eval: error: {e.one_line()}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
