/**
 * The card that says a call's checks did not all run. A rule that errored, ran out of its time
 * budget or was skipped when the call's budget ran out produces no card, and to a clinician no
 * card reads as "no issue found": a safety check that failed silently. So the answer says so,
 * at least as a warning (an `info` card reads as noise), and as `critical` when what was lost
 * may have been a critical card. The text names the rules by their titles from the pack (never
 * patient data or error texts).
 */
import type { CompiledPack, EvaluationResult, Indicator, RawCard, TraceEntry } from './types.ts';

/** `ruleId` of the card (dropped before the EHR sees it, kept in the invocation record). */
export const INCOMPLETE_EVALUATION_RULE_ID = 'cellcds.incomplete-evaluation';

/** Rules named in the card's detail; the rest are counted. */
const MAX_NAMED_RULES = 10;

const REASONS: Partial<Record<TraceEntry['status'], string>> = {
  error: 'failed',
  timeout: 'ran out of time',
  skipped: 'not started before the time ran out',
};

/**
 * How loud the card is: `critical` when no rule of the call completed (nothing was checked) or
 * when any rule that did not complete gives a `critical` card; else `warning`. A card's
 * indicator is a fixed value of the pack (the schema allows no expression there), so the
 * compiled rule knows it; a rule the pack does not name counts as critical (fail closed).
 */
function indicatorFor(
  pack: CompiledPack,
  trace: readonly TraceEntry[],
  unfinished: readonly TraceEntry[],
): Indicator {
  if (unfinished.length === trace.length) {
    return 'critical';
  }
  const indicators = new Map<string, Indicator>(
    pack.pack.rules.map((r) => [r.id, r.card.indicator]),
  );
  const mayBeCritical = unfinished.some((t) => {
    const indicator = indicators.get(t.ruleId);
    return indicator !== 'info' && indicator !== 'warning';
  });
  return mayBeCritical ? 'critical' : 'warning';
}

/**
 * A `warning` or `critical` card (see {@link indicatorFor}) when some of the call's rules did
 * not complete (`error`, `timeout`, `skipped` in the trace); undefined when every rule ran.
 */
export function incompleteEvaluationCard(
  pack: CompiledPack,
  trace: readonly TraceEntry[],
): RawCard | undefined {
  const unfinished = trace.filter((t) => REASONS[t.status] !== undefined);
  if (unfinished.length === 0) {
    return undefined;
  }
  const titles = new Map(pack.pack.rules.map((r) => [r.id, r.title ?? r.id]));
  const lines = unfinished
    .slice(0, MAX_NAMED_RULES)
    .map((t) => `- ${titles.get(t.ruleId) ?? t.ruleId} (${REASONS[t.status] ?? ''})`);
  if (unfinished.length > MAX_NAMED_RULES) {
    lines.push(`- and ${unfinished.length - MAX_NAMED_RULES} more`);
  }
  const n = unfinished.length;
  return {
    ruleId: INCOMPLETE_EVALUATION_RULE_ID,
    summary: `${n} of ${trace.length} checks could not run: no card from them does not mean no issue`,
    detail:
      `These checks of ${pack.pack.title} did not complete on this call, so they could not ` +
      `warn you:\n\n${lines.join('\n')}\n\nCheck what they cover by other means, or try again. ` +
      'The failure is recorded for the service operator.',
    indicator: indicatorFor(pack, trace, unfinished),
    source: { label: `${pack.pack.title} (${pack.pack.publisher})` },
  };
}

/** The call's cards, with the incomplete-evaluation card last when some rules did not run. */
export function answerCards(
  pack: CompiledPack,
  result: Pick<EvaluationResult, 'cards' | 'trace'>,
): RawCard[] {
  const incomplete = incompleteEvaluationCard(pack, result.trace);
  return incomplete ? [...result.cards, incomplete] : result.cards;
}
