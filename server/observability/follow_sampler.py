"""The OpenTelemetry SDK's sampler under taskring's head sampling (tracing.HeadSampling).

Its own module because it needs the SDK, which is imported only when tracing is on."""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from .tracing import KEPT


class FollowHeadSampling(Sampler):
    """Keeps a span whose parent is sampled, and a root only when taskring's head sampling
    kept its RPC; drops every other span (a library's, say the Anthropic SDK's, outside a
    kept task). The decision was made before the span: this only follows it."""

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        kept = parent.trace_flags.sampled if parent.is_valid else False
        if kept or otel_context.get_value(KEPT, parent_context):
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, parent.trace_state)
        return SamplingResult(Decision.DROP, None, parent.trace_state)

    def get_description(self) -> str:
        return "FollowHeadSampling"
