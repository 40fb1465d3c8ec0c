"""The screener pipeline after the feature engine: FeatureSnapshots → model → score → rank → storage/notifiers/digest.

Replay and live mode (which turn MarketEvents into FeatureSnapshots) both drive this one object, so they run the same
code. Each ALERT reaches the notifiers with its template explanation (`payload.headline`, `payload.explanation`; the
digest and the store keep the event as ranked), and the status page shows the latest one per symbol. The snapshots
of a tick are predicted in one batch; when the batch fails (a DataError from a model) each is
predicted alone, and one that still fails is counted under `errors` and skipped; the pipeline carries on.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from typing import Protocol

from cambium.core.errors import CambiumError, ConfigError
from cambium.screener.config import NotifyConfig, ScreenerConfig
from cambium.screener.contracts import ExplainInput, ExplainOutput, FeatureSnapshot, PredictionSnapshot, RankEvent
from cambium.screener.digest import ReplayDigest
from cambium.screener.explain import ALERT_EVENTS, alert_input, with_explanation
from cambium.screener.explain_llm import BackgroundExplainer, Explainer, Explanation
from cambium.screener.model_runner import ModelRunner
from cambium.screener.notify import RetryPolicy, TelegramNotifier, WebhookNotifier
from cambium.screener.ranker import Ranker
from cambium.screener.scorer import Scored, Scorer
from cambium.screener.storage import ScreenerStore

__all__ = ["Notifier", "Pipeline", "build_notifiers"]

log = logging.getLogger("cambium.screener.pipeline")


class Notifier(Protocol):
    def offer(self, event: RankEvent) -> bool: ...

    def close(self) -> None: ...


def build_notifiers(cfg: NotifyConfig, env: Mapping[str, str], top_k: int = 20) -> list[Notifier]:
    """The enabled channels; the Telegram token is read from `env` (pass os.environ from the CLI)."""
    out: list[Notifier] = []
    if cfg.terminal.enabled:
        from cambium.screener.terminal import TerminalTable

        table = TerminalTable(top_k, cfg.terminal.redraws_per_s, cfg.terminal.burst)
        table.start()
        out.append(table)
    if cfg.webhook.enabled:
        w = cfg.webhook
        out.append(WebhookNotifier(w.url, w.rate_per_s, w.burst, w.queue_size, w.timeout_s,
                                   retry=RetryPolicy.from_config(w)))
    if cfg.telegram.enabled:
        t = cfg.telegram
        token = env.get(t.token_env, "")
        if not token:
            raise ConfigError(f"notify.telegram.enabled=true but the environment variable {t.token_env} "
                              "(notify.telegram.token_env) holding the bot token is empty or unset")
        out.append(TelegramNotifier(t.api_url, token, t.chat_id, t.events, t.rate_per_s, t.burst, t.queue_size,
                                    t.timeout_s, retry=RetryPolicy.from_config(t)))
    return out


class Pipeline:
    def __init__(self, cfg: ScreenerConfig | None = None, runner: ModelRunner | None = None,
                 store: ScreenerStore | None = None, notifiers: Iterable[Notifier] = ()) -> None:
        self.cfg = cfg or ScreenerConfig()
        self.scorer = Scorer(self.cfg.scorer, self.cfg.status)
        self.runner = runner or ModelRunner(self.cfg.model, self.scorer)
        self.ranker = Ranker(self.cfg.ranker)
        self.store = store
        self.notifiers = list(notifiers)
        self.digest = ReplayDigest()
        self.counts: Counter[str] = Counter()
        self.explainer = Explainer(self.cfg.explain)
        self._background: BackgroundExplainer | None = None
        self.explanations: dict[str, ExplainOutput] = {}
        """The latest ALERT explanation of each symbol (the status page shows them)."""
        self.top: Scored | None = None
        """The highest score seen (says why a quiet recording gave no RankEvent)."""

    def step(self, ts: int, snapshots: Iterable[FeatureSnapshot]) -> list[RankEvent]:
        """One cadence tick at time `ts`: predict and score every snapshot, update the ranking, fan the events out."""
        return self.decide(ts, self.predict(list(snapshots)))

    def predict(self, snaps: list[FeatureSnapshot]) -> list[tuple[FeatureSnapshot, PredictionSnapshot]]:
        """The model half of a step (what a shard worker runs): the snapshots of one tick predicted in one batch."""
        try:
            return list(zip(snaps, self.runner.predict_batch(snaps), strict=True))
        except CambiumError:
            return self._one_by_one(snaps)

    def decide(self, ts: int,
               done: Iterable[tuple[FeatureSnapshot | None, PredictionSnapshot]]) -> list[RankEvent]:
        """The ranking half of a step (what the sharded runner's parent runs on the workers' predictions, with no
        snapshot): score, rank, store, digest, notify."""
        scored: list[Scored] = []
        predictions: list[PredictionSnapshot] = []
        for snap, pred in done:
            predictions.append(pred)
            scored.append(Scored(pred.ts, pred.symbol, self.scorer.score(pred), pred.status, pred.reasons))
            if self.store is not None:
                if snap is not None:
                    self.store.write(snap)
                self.store.write(pred)
        self.counts["snapshots"] += len(predictions)
        for sc in scored:
            if self.top is None or sc.score > self.top.score:
                self.top = sc
        events = self.ranker.update(ts, scored)
        by_symbol = {p.symbol: p for p in predictions} if events else {}
        for event in events:
            self.digest.update(event)
            if self.store is not None:
                self.store.write(event)
            notified = event
            alerted = by_symbol.get(event.symbol)
            if event.event in ALERT_EVENTS and alerted is not None:
                notified = with_explanation(event, self._explain(alert_input(event, alerted)))
            for notifier in self.notifiers:
                notifier.offer(notified)
        self.counts["events"] += len(events)
        return events

    def _explain(self, inp: ExplainInput) -> ExplainOutput:
        """The template now (notifiers and the status page show it); with `explain.llm_enabled`, the LLM's valid
        rewording replaces it on the status page when it arrives, off the scoring path."""
        out = self.explainer.template(inp).output
        self.explanations[inp.symbol] = out
        if self.explainer.llm is not None:
            if self._background is None:
                self._background = BackgroundExplainer(self.explainer)

            def done(future: Future[Explanation], symbol: str = inp.symbol, template: ExplainOutput = out) -> None:
                if not future.cancelled() and future.exception() is None and self.explanations.get(symbol) is template:
                    self.explanations[symbol] = future.result().output

            self._background.submit(inp).add_done_callback(done)
        return out

    def _one_by_one(self, snaps: list[FeatureSnapshot]) -> list[tuple[FeatureSnapshot, PredictionSnapshot]]:
        """A batch failed: predict each snapshot alone so that one bad snapshot costs only itself."""
        out = []
        for snap in snaps:
            try:
                out.append((snap, self.runner.predict(snap)))
            except CambiumError as exc:
                self.counts["errors"] += 1
                log.warning("skipped %s at ts=%d: %s", snap.symbol, snap.ts, exc)
        return out

    def close(self) -> None:
        if self._background is not None:
            self._background.close()
        for notifier in self.notifiers:
            notifier.close()
        if self.store is not None:
            self.store.close()
