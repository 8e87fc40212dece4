/**
 * One hook call after authentication and request validation, shared by the CDS Hooks route
 * and the SMART app API: prefetch, pack version (pinned or canary), evaluation, cards, and the
 * invocation record persisted durably before anyone gets an answer.
 */
import crypto from 'node:crypto';
import { finalizeCards, resolvePrefetch } from '../hooks/index.ts';
import type { Card, HookRequest } from '../hooks/index.ts';
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
export async function runHookCall(
  deps: Deps,
  tenant: Tenant,
  resolved: ResolvedService,
  request: HookRequest,
): Promise<HookCallOutcome> {
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
    { inputJson },
  );
  deps.metrics.ruleTrace(pack.id, result.trace);
  const cards = finalizeCards(result.cards);
  // Durable before the response: the inputs, cards and trace sealed under the tenant's current
  // data key; ids and the pack stamp (id@version@hash) in clear, no PHI.
  const invocationId = crypto.randomUUID();
  await deps.stores.store(tenant.id).saveInvocation({
    id: invocationId,
    time: now,
    service: resolved.service.id,
    hook: request.hook,
    hookInstance: request.hookInstance,
    pack: { id: pack.id, version: pack.version, hash: pack.hash },
    cardUuids: cards.map((c) => c.uuid),
    suggestionUuids: cards.flatMap((c) => (c.suggestions ?? []).map((s) => s.uuid)),
    secretJson: `${inputJson.slice(0, -1)},"cards":${JSON.stringify(cards)},"trace":${JSON.stringify(result.trace)}}`,
  });
  return { cards, pack, result, invocationId };
}
