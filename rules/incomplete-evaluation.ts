/**
 * The card that says a call's checks did not all run. A rule that errored, ran out of its time
 * budget or was skipped when the call's budget ran out produces no card, and to a clinician no
 * card reads as "no issue found": a safety check that failed silently. So the answer says so.
 * The text names the rules by their titles from the pack (never patient data or error texts).
 */
import type { CompiledPack, EvaluationResult, RawCard, TraceEntry } from './types.ts';

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
 * An `info` card when some of the call's rules did not complete (`error`, `timeout`,
 * `skipped` in the trace); undefined when every rule ran.
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
    indicator: 'info',
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
