/**
 * One hook call after authentication and request validation, shared by the CDS Hooks route
 * and the SMART app API: prefetch, pack version (pinned or canary), evaluation, cards, and the
 * invocation record persisted durably before anyone gets an answer.
 */
import crypto from 'node:crypto';
import { finalizeCards, resolvePrefetch } from '../hooks/index.ts';
import type { Card, HookRequest } from '../hooks/index.ts';
import { answerCards } from '../rules/index.ts';
import type { CompiledPack, EvaluationResult } from '../rules/index.ts';
import type { Tenant } from '../tenants/index.ts';
import type { Deps } from './context.ts';
import type { ResolvedService } from './service-directory.ts';

export interface HookCallOutcome {
  cards: Card[];
  pack: CompiledPack;
  result: EvaluationResult;
  invocationId: string;
}

/**
 * @throws PrefetchError (412) when required data cannot be obtained; errors of the store
 * (the call then fails: an answer is never given without its record).
 */
export function runHookCall(
  deps: Deps,
  tenant: Tenant,
  resolved: ResolvedService,
  request: HookRequest,
): Promise<HookCallOutcome> {
  // Not an async function on purpose: the record's write is most of a call's wait, and V8
  // keeps an async function's parameters and locals alive across every await. Awaiting the
  // write here would keep `request` (the parsed context and prefetch, tens of KiB of objects)
  // alive meanwhile, and every scavenge would copy it. evaluateAndSeal returns once the record
  // is sealed and its write started; from then on only the write's bytes are held.
  return evaluateAndSeal(deps, tenant, resolved, request).then(async ({ outcome, saved }) => {
    await saved;
    return outcome;
  });
}

/** Prefetch, evaluation and cards; starts the record's write and returns its promise. */
async function evaluateAndSeal(
  deps: Deps,
  tenant: Tenant,
  resolved: ResolvedService,
  request: HookRequest,
): Promise<{ outcome: HookCallOutcome; saved: Promise<unknown> }> {
  const { prefetch } = await resolvePrefetch({
    templates: resolved.service.prefetch,
    request,
    allowedFhirServers: tenant.fhirServers,
    fetchOptions: deps.config.prefetch,
    observer: deps.metrics.prefetchObserver(),
  });
  const pack = await deps.directory.packForCall(resolved, request.hookInstance);
  const now = deps.now();
  // Serialized once: the evaluation worker reads it, and the invocation record starts with it.
  const inputJson = JSON.stringify({ context: request.context, prefetch });
  const result = await deps.evaluator.evaluate(
    pack,
    resolved.service.id,
    {
      hook: request.hook,
      hookInstance: request.hookInstance,
      context: request.context,
      prefetch,
      now,
    },
    { inputJson, scope: tenant.id },
  );
  deps.metrics.ruleTrace(pack.id, result.trace);
  // Rules that did not complete gave no card; the clinician must not read that as "no issue".
  // A summary shortened there is noted in the trace (counted as a rule error by cds-routes.ts).
  const raw = answerCards(pack, result);
  const cards = finalizeCards(raw, undefined, result.trace);
  // Durable before the response: the inputs, cards and trace sealed under the tenant's current
  // data key; ids and the pack stamp (id@version@hash) in clear, no PHI.
  const invocationId = crypto.randomUUID();
  const saved = deps.stores.store(tenant.id).saveInvocation({
    id: invocationId,
    time: now,
    service: resolved.service.id,
    hook: request.hook,
    hookInstance: request.hookInstance,
    pack: { id: pack.id, version: pack.version, hash: pack.hash },
    cardUuids: cards.map((c) => c.uuid),
    suggestionUuids: cards.flatMap((c) => (c.suggestions ?? []).map((s) => s.uuid)),
    // Each card's own: feedback on a card may accept only its suggestions (CDS Hooks 2.0).
    cardSuggestionUuids: cards.map((c) => (c.suggestions ?? []).map((s) => s.uuid)),
    // Which rule made each card and the reasons it offered (pack metadata, in clear on the
    // card's link): the override-rate report counts by them without opening a record.
    cardRules: raw.map((c) => ({
      ruleId: c.ruleId,
      overrideReasons: (c.overrideReasons ?? []).map((r) => `${r.system}|${r.code}`),
    })),
    secretJson: `${inputJson.slice(0, -1)},"cards":${JSON.stringify(cards)},"trace":${JSON.stringify(result.trace)}}`,
  });
  // Awaited by runHookCall right after this returns; marked handled so that a write failing
  // before that (bad input) is not reported as an unhandled rejection meanwhile.
  saved.catch(() => undefined);
  return { outcome: { cards, pack, result, invocationId }, saved };
}
