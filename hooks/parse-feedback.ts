/**
 * Parsing a CDS Hooks 2.0 feedback body (`POST /cds-services/{id}/feedback`).
 */
import { z } from 'zod';
import { HookRequestError } from './errors.ts';
import type { FeedbackItem } from './types.ts';
import { assertSafeJsonKeys, formatField, isJsonObject, parseWithSchema } from './validation.ts';

/** RFC 3339 §5.6 date-time (seconds required, optional fraction, Z or numeric offset). */
const RFC3339 =
  /^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-](\d{2}):(\d{2}))$/;

function isRfc3339DateTime(value: string): boolean {
  const m = RFC3339.exec(value);
  if (m === null) {
    return false;
  }
  const [year, month, day, hour, minute, second] = m.slice(1, 7).map(Number) as [
    number,
    number,
    number,
    number,
    number,
    number,
  ];
  const daysInMonth = new Date(Date.UTC(year, month, 0)).getUTCDate();
  const offsetOk = m[9] === undefined || (Number(m[9]) <= 23 && Number(m[10]) <= 59);
  return (
    month >= 1 &&
    month <= 12 &&
    day >= 1 &&
    day <= daysInMonth &&
    hour <= 23 &&
    minute <= 59 &&
    second <= 60 && // leap second
    offsetOk
  );
}

const nonEmpty = z.string().min(1, { error: 'must not be empty' });

const codingSchema = z.looseObject({
  code: nonEmpty,
  system: nonEmpty,
  display: nonEmpty.optional(),
});

const feedbackItemSchema = z.looseObject({
  card: nonEmpty,
  outcome: z.enum(['accepted', 'overridden'], { error: 'must be accepted or overridden' }),
  acceptedSuggestions: z
    .array(z.looseObject({ id: nonEmpty }))
    .min(1, { error: 'must list at least one suggestion' })
    .optional(),
  overrideReason: z
    .looseObject({ reason: codingSchema.optional(), userComment: nonEmpty.optional() })
    .optional(),
  outcomeTimestamp: z
    .string()
    .refine(isRfc3339DateTime, { error: 'must be an RFC 3339 date-time' }),
});

/**
 * Validates a feedback body `{ "feedback": [ ... ] }` (non-empty): each item has `card`,
 * `outcome` accepted|overridden, `acceptedSuggestions` (non-empty, each `{id}`) when accepted,
 * an optional `overrideReason` `{reason?: Coding(code, system, display?), userComment?}` that is
 * not empty, and `outcomeTimestamp` as an RFC 3339 date-time. Unknown fields are tolerated and
 * dropped. Keys `__proto__`/`constructor`/`prototype` anywhere are refused.
 * @throws HookRequestError naming the field, e.g. `feedback[0].outcome`.
 */
export function parseFeedbackRequest(body: unknown): FeedbackItem[] {
  if (!isJsonObject(body)) {
    throw new HookRequestError('body', 'must be a JSON object');
  }
  assertSafeJsonKeys(body);
  const feedback = body['feedback'];
  if (feedback === undefined) {
    throw new HookRequestError('feedback', 'is required');
  }
  if (!Array.isArray(feedback) || feedback.length === 0) {
    throw new HookRequestError('feedback', 'must be a non-empty array');
  }
  return (feedback as unknown[]).map((raw, i): FeedbackItem => {
    const base = formatField('feedback', [i]);
    const item = parseWithSchema(feedbackItemSchema, raw, base);
    if (item.outcome === 'accepted' && item.acceptedSuggestions === undefined) {
      throw new HookRequestError(
        `${base}.acceptedSuggestions`,
        'is required when outcome is accepted',
      );
    }
    const reason = item.overrideReason;
    if (reason !== undefined && reason.reason === undefined && reason.userComment === undefined) {
      throw new HookRequestError(`${base}.overrideReason`, 'needs a reason or a userComment');
    }
    return {
      card: item.card,
      outcome: item.outcome,
      ...(item.acceptedSuggestions === undefined
        ? {}
        : { acceptedSuggestions: item.acceptedSuggestions.map((s) => ({ id: s.id })) }),
      ...(reason === undefined
        ? {}
        : {
            overrideReason: {
              ...(reason.reason === undefined
                ? {}
                : {
                    reason: {
                      system: reason.reason.system,
                      code: reason.reason.code,
                      ...(reason.reason.display === undefined
                        ? {}
                        : { display: reason.reason.display }),
                    },
                  }),
              ...(reason.userComment === undefined ? {} : { userComment: reason.userComment }),
            },
          }),
      outcomeTimestamp: item.outcomeTimestamp,
    };
  });
}
