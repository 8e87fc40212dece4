/**
 * Input checks of the tenant store. Clear-text columns must hold identifiers only (no PHI),
 * so they are checked for shape and length; the sealed part must be JSON-serialisable.
 * Every refusal is an InvalidInputError naming the field; messages never echo values.
 */
import { InvalidInputError } from '../errors.ts';
import { RECORD_ID_PATTERN } from './ids.ts';
import type { FeedbackInput, InvocationQuery, NewInvocation } from './types.ts';

const NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$/;
const PRINTABLE = /^[^\u0000-\u001f\u007f]{1,256}$/;
const MAX_UUIDS = 1000;
const MAX_FEEDBACK = 1000;

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function id(value: unknown, field: string): string {
  if (typeof value !== 'string' || !RECORD_ID_PATTERN.test(value)) {
    throw new InvalidInputError(field, 'must be an id (letters, digits, ._:-; at most 128)');
  }
  return value;
}

function name(value: unknown, field: string): string {
  if (typeof value !== 'string' || !NAME_PATTERN.test(value)) {
    throw new InvalidInputError(field, 'must be a short name (letters, digits, ._:@/-)');
  }
  return value;
}

/** Normalises an instant to ISO 8601 UTC. @throws InvalidInputError(field). */
export function instant(value: unknown, field: string): string {
  const d = value instanceof Date ? value : typeof value === 'string' ? new Date(value) : undefined;
  if (!d || Number.isNaN(d.getTime())) {
    throw new InvalidInputError(field, 'must be an ISO 8601 instant');
  }
  return d.toISOString();
}

function idList(value: unknown, field: string): string[] {
  if (!Array.isArray(value) || value.length > MAX_UUIDS) {
    throw new InvalidInputError(field, `must be an array of at most ${MAX_UUIDS} ids`);
  }
  const out = value.map((v, i) => id(v, `${field}[${i}]`));
  if (new Set(out).size !== out.length) {
    throw new InvalidInputError(field, 'must not repeat an id');
  }
  return out;
}

/** A validated invocation: clear metadata plus the serialised secret. */
export interface ValidInvocation {
  id: string;
  time: string;
  service: string;
  hook: string;
  hookInstance: string;
  pack: { id: string; version: string; hash: string };
  cardUuids: string[];
  suggestionUuids: string[];
  /** Each card's suggestion uuids, in the order of `cardUuids`; undefined if not given. */
  cardSuggestionUuids: string[][] | undefined;
  /** Each card's rule and offered override codes, in the order of `cardUuids`; or undefined. */
  cardRules: Array<{ ruleId: string; overrideReasons?: string[] }> | undefined;
  secretJson: string;
}

/**
 * An override reason code as stored in clear: `system|code` from a pack's card template, at most
 * 510 characters, no control characters (nothing here is the clinician's text).
 */
const REASON_CODE = /^[^\u0000-\u001f\u007f]{3,510}$/;
/** Override reason codes kept per card (a template's list; more is not a pack's). */
const MAX_CARD_REASONS = 64;

/**
 * `cardRules`: one `{ ruleId, overrideReasons? }` per card of `cardUuids`. Stored in clear, so
 * shapes only: a rule id is a short name; of the reasons (an array of strings), only printable
 * `system|code` strings are kept, the first MAX_CARD_REASONS of them: a pack's odd code is left
 * out (overrides naming it count under no code) rather than failing the hook call that made
 * the card.
 */
function cardRuleList(
  value: unknown,
  cardUuids: readonly string[],
): Array<{ ruleId: string; overrideReasons?: string[] }> | undefined {
  const field = 'cardRules';
  if (value === undefined) {
    return undefined;
  }
  if (!Array.isArray(value) || value.length !== cardUuids.length) {
    throw new InvalidInputError(field, 'must hold one { ruleId, overrideReasons? } per card');
  }
  return value.map((v: unknown, i) => {
    const f = `${field}[${i}]`;
    if (!isObject(v)) {
      throw new InvalidInputError(f, 'must be { ruleId, overrideReasons? }');
    }
    const ruleId = name(v.ruleId, `${f}.ruleId`);
    if (v.overrideReasons === undefined) {
      return { ruleId };
    }
    const reasons: unknown = v.overrideReasons;
    if (!Array.isArray(reasons) || !reasons.every((r) => typeof r === 'string')) {
      throw new InvalidInputError(`${f}.overrideReasons`, 'must be an array of system|code');
    }
    const kept = reasons.filter(
      (r) => REASON_CODE.test(r) && r.includes('|') && !r.startsWith('|') && !r.endsWith('|'),
    );
    // None kept: as none offered (a NULL on the link, whichever backend writes it).
    return kept.length === 0
      ? { ruleId }
      : { ruleId, overrideReasons: [...new Set(kept)].slice(0, MAX_CARD_REASONS) };
  });
}

/**
 * `cardSuggestionUuids`: one id list per card, together exactly `suggestionUuids`, each
 * suggestion under one card (what the feedback check relies on).
 */
function cardSuggestionLists(
  value: unknown,
  cardUuids: readonly string[],
  suggestionUuids: readonly string[],
): string[][] | undefined {
  const field = 'cardSuggestionUuids';
  if (value === undefined) {
    return undefined;
  }
  if (!Array.isArray(value) || value.length !== cardUuids.length) {
    throw new InvalidInputError(field, 'must hold one array of ids per card of cardUuids');
  }
  const lists = value.map((v: unknown, i) => idList(v, `${field}[${i}]`));
  const all = lists.flat();
  const known = new Set(suggestionUuids);
  if (
    all.length !== known.size ||
    new Set(all).size !== all.length ||
    !all.every((s) => known.has(s))
  ) {
    throw new InvalidInputError(field, 'must hold each of suggestionUuids under exactly one card');
  }
  return lists;
}

const SECRET_JSON_START = '{"context":';
const SECRET_JSON_TRACE = ',"trace":';

/** The secret as JSON text: given by the caller (checked for its shape) or serialized here. */
function serializedSecret(secret: unknown, given: unknown): string {
  if (given !== undefined) {
    if (secret !== undefined) {
      throw new InvalidInputError('secret', 'give either secret or secretJson, not both');
    }
    // Shape only, from both ends (this runs on every hook call; a scan of the ~35 KiB text, or a
    // parse, would cost more than the write): the object starts with context and its last
    // member is trace.
    if (
      typeof given !== 'string' ||
      !given.startsWith(SECRET_JSON_START) ||
      !given.endsWith('}') ||
      given.lastIndexOf(SECRET_JSON_TRACE) < SECRET_JSON_START.length
    ) {
      throw new InvalidInputError(
        'secretJson',
        'must be the JSON text of { context, prefetch, cards, trace }',
      );
    }
    return given;
  }
  if (!isObject(secret)) {
    throw new InvalidInputError('secret', 'must be { context, prefetch, cards, trace }');
  }
  let json: string | undefined;
  try {
    json = JSON.stringify({
      context: secret.context ?? null,
      prefetch: secret.prefetch ?? null,
      cards: secret.cards ?? null,
      trace: secret.trace ?? null,
    });
  } catch {
    json = undefined;
  }
  if (json === undefined) {
    throw new InvalidInputError('secret', 'must be JSON-serialisable');
  }
  return json;
}

/** @throws InvalidInputError naming the field. */
export function validateInvocation(input: NewInvocation): ValidInvocation {
  const raw: unknown = input;
  if (!isObject(raw)) {
    throw new InvalidInputError('invocation', 'must be an object');
  }
  const pack = raw.pack;
  if (!isObject(pack)) {
    throw new InvalidInputError('pack', 'must be { id, version, hash }');
  }
  if (typeof raw.hookInstance !== 'string' || !PRINTABLE.test(raw.hookInstance)) {
    throw new InvalidInputError(
      'hookInstance',
      'must be a printable string of at most 256 characters',
    );
  }
  const secretJson = serializedSecret(raw.secret, raw.secretJson);
  const cardUuids = idList(raw.cardUuids, 'cardUuids');
  const suggestionUuids = idList(raw.suggestionUuids, 'suggestionUuids');
  return {
    id: id(raw.id, 'id'),
    time: instant(raw.time, 'time'),
    service: name(raw.service, 'service'),
    hook: name(raw.hook, 'hook'),
    hookInstance: raw.hookInstance,
    pack: {
      id: name(pack.id, 'pack.id'),
      version: name(pack.version, 'pack.version'),
      hash: name(pack.hash, 'pack.hash'),
    },
    cardUuids,
    suggestionUuids,
    cardSuggestionUuids: cardSuggestionLists(raw.cardSuggestionUuids, cardUuids, suggestionUuids),
    cardRules: cardRuleList(raw.cardRules, cardUuids),
    secretJson,
  };
}

/** Validated filters of `listInvocations`. */
export interface ValidQuery {
  from?: string;
  to?: string;
  hook?: string;
  limit: number;
}

/** @throws InvalidInputError naming the field. */
export function validateQuery(query: InvocationQuery): ValidQuery {
  const raw: unknown = query;
  if (!isObject(raw)) {
    throw new InvalidInputError('query', 'must be an object');
  }
  const out: ValidQuery = { limit: 100 };
  if (raw.from !== undefined) {
    out.from = instant(raw.from, 'from');
  }
  if (raw.to !== undefined) {
    out.to = instant(raw.to, 'to');
  }
  if (raw.hook !== undefined) {
    out.hook = name(raw.hook, 'hook');
  }
  if (raw.limit !== undefined) {
    const limit = raw.limit;
    if (typeof limit !== 'number' || !Number.isInteger(limit) || limit < 1 || limit > 1000) {
      throw new InvalidInputError('limit', 'must be an integer from 1 to 1000');
    }
    out.limit = limit;
  }
  return out;
}

/** @throws InvalidInputError naming the field, e.g. `feedback[2].outcome`. */
export function validateFeedback(
  items: readonly FeedbackInput[],
  service: unknown,
): FeedbackInput[] {
  name(service, 'service');
  const raw: unknown = items;
  if (!Array.isArray(raw) || raw.length === 0 || raw.length > MAX_FEEDBACK) {
    throw new InvalidInputError(
      'feedback',
      `must be a non-empty array of at most ${MAX_FEEDBACK} items`,
    );
  }
  return raw.map((item: unknown, i) => {
    const f = `feedback[${i}]`;
    if (!isObject(item)) {
      throw new InvalidInputError(f, 'must be an object');
    }
    const out: FeedbackInput = {
      card: id(item.card, `${f}.card`),
      outcome: (() => {
        if (item.outcome !== 'accepted' && item.outcome !== 'overridden') {
          throw new InvalidInputError(`${f}.outcome`, 'must be accepted or overridden');
        }
        return item.outcome;
      })(),
      outcomeTimestamp: (() => {
        if (
          typeof item.outcomeTimestamp !== 'string' ||
          Number.isNaN(Date.parse(item.outcomeTimestamp))
        ) {
          throw new InvalidInputError(`${f}.outcomeTimestamp`, 'must be a date-time');
        }
        return item.outcomeTimestamp;
      })(),
    };
    if (item.acceptedSuggestions !== undefined) {
      const list = item.acceptedSuggestions;
      if (!Array.isArray(list) || list.length > MAX_UUIDS) {
        throw new InvalidInputError(`${f}.acceptedSuggestions`, 'must be an array of { id }');
      }
      out.acceptedSuggestions = list.map((s: unknown, j) => {
        if (!isObject(s)) {
          throw new InvalidInputError(`${f}.acceptedSuggestions[${j}]`, 'must be { id }');
        }
        return { id: id(s.id, `${f}.acceptedSuggestions[${j}].id`) };
      });
    }
    if (item.overrideReason !== undefined) {
      if (!isObject(item.overrideReason)) {
        throw new InvalidInputError(`${f}.overrideReason`, 'must be an object');
      }
      // Sealed as given (it may hold a free-text comment); only its JSON shape matters here.
      out.overrideReason = JSON.parse(JSON.stringify(item.overrideReason)) as NonNullable<
        FeedbackInput['overrideReason']
      >;
    }
    return out;
  });
}
