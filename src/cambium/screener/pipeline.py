"""The screener pipeline after the feature engine: FeatureSnapshots → model → score → rank → storage/notifiers/digest.

Replay and live mode (which turn MarketEvents into FeatureSnapshots) both drive this one object, so they run the same
code. A snapshot that cannot be predicted (a DataError from a model) is counted under `errors` and skipped; the
pipeline carries on.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Protocol

from cambium.core.errors import CambiumError, ConfigError
from cambium.screener.config import NotifyConfig, ScreenerConfig
from cambium.screener.contracts import FeatureSnapshot, PredictionSnapshot, RankEvent
from cambium.screener.digest import ReplayDigest
from cambium.screener.model_runner import ModelRunner
from cambium.screener.notify import TelegramNotifier, WebhookNotifier
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
        out.append(WebhookNotifier(w.url, w.rate_per_s, w.burst, w.queue_size, w.timeout_s))
    if cfg.telegram.enabled:
        t = cfg.telegram
        token = env.get(t.token_env, "")
        if not token:
            raise ConfigError(f"notify.telegram.enabled=true but the environment variable {t.token_env} "
                              "(notify.telegram.token_env) holding the bot token is empty or unset")
        out.append(TelegramNotifier(t.api_url, token, t.chat_id, t.events, t.rate_per_s, t.burst, t.queue_size,
                                    t.timeout_s))
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

    def step(self, ts: int, snapshots: Iterable[FeatureSnapshot]) -> list[RankEvent]:
        """One cadence tick at time `ts`: predict and score every snapshot, update the ranking, fan the events out."""
        scored: list[Scored] = []
        predictions: list[PredictionSnapshot] = []
        for snap in snapshots:
            try:
                pred = self.runner.predict(snap)
            except CambiumError as exc:
                self.counts["errors"] += 1
                log.warning("skipped %s at ts=%d: %s", snap.symbol, snap.ts, exc)
                continue
            predictions.append(pred)
            scored.append(Scored(pred.ts, pred.symbol, self.scorer.score(pred), pred.status, pred.reasons))
            if self.store is not None:
                self.store.write(snap)
                self.store.write(pred)
        self.counts["snapshots"] += len(predictions)
        events = self.ranker.update(ts, scored)
        for event in events:
            self.digest.update(event)
            if self.store is not None:
                self.store.write(event)
            for notifier in self.notifiers:
                notifier.offer(event)
        self.counts["events"] += len(events)
        return events

    def close(self) -> None:
        for notifier in self.notifiers:
            notifier.close()
        if self.store is not None:
            self.store.close()
