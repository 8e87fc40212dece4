/**
 * Audits refused credentials (CDS client tokens, SMART id_tokens, operator tokens) within a
 * budget per second. Each refusal would otherwise cost a durable control-plane write, so a
 * flood of garbage tokens, which needs no credential at all, could make the service spend its
 * disk and its write queue on them. The first `perSecond` refusals of each second are audited
 * one by one, as before; the rest are counted by event type and reason (and by the event's
 * tenant and actor, when it has them) and written as one `<type>.suppressed` event per type and
 * reason (`{ reason, count, from, to }`, with that tenant and actor) when the second is over.
 * Metrics still count every refusal.
 *
 * Used for refused admin accesses too (`admin.forbidden`, 403): a principal flooding another
 * tenant's routes costs one write per second, reason, target tenant and actor, and the counts
 * still name who tried and on which tenant. A tenant or actor given here must come from a
 * bounded set (a registered tenant, an authenticated token), never from the request's text.
 */
import type { AuditEvent } from '../tenants/index.ts';

/** A refusal to audit: a failure event whose detail names its reason. */
export type FailureEvent = AuditEvent & {
  detail: { reason: string } & Record<string, string | number | boolean>;
};

export interface FailureAuditor {
  /** Audits `event`, or counts it when this second's budget is spent. */
  record(event: FailureEvent): Promise<void>;
  /** Writes the counts of suppressed refusals now (shutdown, tests). */
  flush(): Promise<void>;
}

interface Suppressed {
  type: string;
  reason: string;
  tenant: string | undefined;
  actor: string | undefined;
  count: number;
  from: number;
  to: number;
}

/**
 * Count events (`<type>.suppressed`) attributed to a tenant and actor, per second; beyond them,
 * counts go to one event per type and reason without either (at most one more per pair).
 */
export const MAX_COUNT_EVENTS_PER_SECOND = 20;

export function createFailureAuditor(opts: {
  audit: (event: AuditEvent) => Promise<unknown>;
  /** Refusals audited one by one per second (the rest are counted). */
  perSecond: number;
  /** Reports a summary that could not be written (the counts are then lost). */
  onError?: (err: unknown) => void;
  now?: () => number;
}): FailureAuditor {
  const now = opts.now ?? Date.now;
  let second = Number.NEGATIVE_INFINITY;
  let audited = 0;
  // Keyed by type, reason, tenant and actor (never the request's text), at most
  // MAX_COUNT_EVENTS_PER_SECOND keys so attributed, then by type and reason alone.
  const suppressed = new Map<string, Suppressed>();
  let timer: NodeJS.Timeout | undefined;
  /** The flushes' writes, one after another: a flush returns once every earlier one is written. */
  let writing: Promise<void> = Promise.resolve();

  function flush(): Promise<void> {
    if (timer) {
      clearTimeout(timer);
      timer = undefined;
    }
    const pending = [...suppressed.values()];
    suppressed.clear();
    // Chained after the writes already under way (the timer's flush, a new second's): a caller
    // of flush() (shutdown) then knows every count taken so far is written, or sees its error.
    const done = writing.then(async () => {
      for (const s of pending) {
        await opts.audit({
          type: `${s.type}.suppressed`,
          outcome: 'failure',
          ...(s.tenant !== undefined ? { tenant: s.tenant } : {}),
          ...(s.actor !== undefined ? { actor: s.actor } : {}),
          detail: {
            reason: s.reason,
            count: s.count,
            from: new Date(s.from).toISOString(),
            to: new Date(s.to).toISOString(),
          },
        });
      }
    });
    writing = done.catch(() => undefined);
    return done;
  }

  return {
    async record(event) {
      const at = now();
      const current = Math.floor(at / 1000);
      if (current !== second) {
        second = current;
        audited = 0;
        await flush();
      }
      if (audited < opts.perSecond) {
        audited += 1;
        await opts.audit(event);
        return;
      }
      // Counted by who and where for the first keys of the second; past them (many tokens, or
      // many tenants, refused at once) by type and reason alone, so the writes stay bounded.
      let key = [event.type, event.detail.reason, event.tenant ?? '', event.actor ?? ''].join(
        '\u0000',
      );
      let attributed = true;
      if (!suppressed.has(key) && suppressed.size >= MAX_COUNT_EVENTS_PER_SECOND) {
        key = [event.type, event.detail.reason, '\u0001'].join('\u0000');
        attributed = false;
      }
      const entry = suppressed.get(key);
      if (entry) {
        entry.count += 1;
        entry.to = at;
      } else {
        suppressed.set(key, {
          type: event.type,
          reason: event.detail.reason,
          tenant: attributed ? event.tenant : undefined,
          actor: attributed ? event.actor : undefined,
          count: 1,
          from: at,
          to: at,
        });
      }
      if (!timer) {
        timer = setTimeout(
          () => {
            timer = undefined;
            flush().catch((err: unknown) => opts.onError?.(err));
          },
          1000 - (at % 1000) + 5,
        );
        timer.unref();
      }
    },
    flush,
  };
}
