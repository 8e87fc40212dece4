/**
 * The card model as sent to the EHR: engine cards (RawCard) become CDS Hooks 2.0 cards with
 * fresh uuids, a selectionBehavior whenever there are suggestions, and no null/empty fields.
 */
import { randomUUID } from 'node:crypto';
import {
  findBadReference,
  isAbsoluteHttpUrl,
  RELATIVE_REFERENCE,
  shortenSummary,
  SUMMARY_LIMIT,
} from '../rules/index.ts';
import type { RawCard, TraceEntry } from '../rules/index.ts';
import type { Card } from './types.ts';
import { isJsonObject } from './validation.ts';

const INDICATORS: ReadonlySet<string> = new Set(['info', 'warning', 'critical']);
const SELECTION_BEHAVIORS: ReadonlySet<string> = new Set(['at-most-one', 'any']);
const ACTION_TYPES: ReadonlySet<string> = new Set(['create', 'update', 'delete']);
const LINK_TYPES: ReadonlySet<string> = new Set(['absolute', 'smart']);

function isEmpty(value: unknown): boolean {
  return (
    value === null ||
    value === undefined ||
    value === '' ||
    (Array.isArray(value) && value.length === 0) ||
    (isJsonObject(value) && Object.keys(value).length === 0)
  );
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  if (!isJsonObject(value)) {
    return false;
  }
  const proto: unknown = Object.getPrototypeOf(value);
  return proto === Object.prototype || proto === null;
}

/**
 * Deep copy of a JSON value without `null`, `undefined`, `""`, `[]` or `{}` members (CDS Hooks
 * 2.0 "Use of JSON"): empties are removed from objects and arrays, bottom-up, so an object whose
 * members were all empty disappears too. The top-level value itself is returned even if empty,
 * so required empties (`{"cards": []}`) are the caller's to add.
 */
export function stripEmpty<T>(value: T): T {
  return stripValue(value, false) as T;
}

/** FHIR resources keep `""`-free but otherwise intact shape: only `null` members are removed. */
function stripNulls(value: unknown): unknown {
  return stripValue(value, true);
}

function stripValue(value: unknown, nullsOnly: boolean): unknown {
  // Plain loops, no closures: runs on every card of every call (see docs/performance.md).
  if (Array.isArray(value)) {
    const out: unknown[] = [];
    for (const item of value as unknown[]) {
      const stripped = stripValue(item, nullsOnly);
      if (!dropped(stripped, nullsOnly)) {
        out.push(stripped);
      }
    }
    return out;
  }
  if (isPlainObject(value)) {
    const out: Record<string, unknown> = {};
    for (const key of Object.keys(value)) {
      const stripped = stripValue(value[key], nullsOnly);
      if (!dropped(stripped, nullsOnly)) {
        if (key === '__proto__') {
          // A member, as Object.fromEntries would make it, never the copy's prototype.
          Object.defineProperty(out, key, {
            value: stripped,
            enumerable: true,
            writable: true,
            configurable: true,
          });
        } else {
          out[key] = stripped;
        }
      }
    }
    return out;
  }
  return value;
}

function dropped(value: unknown, nullsOnly: boolean): boolean {
  return nullsOnly ? value === null || value === undefined : isEmpty(value);
}

/**
 * Throws on a card that breaks CDS Hooks 2.0: that is a bug upstream. Static fields are checked
 * at pack load, interpolated ones by the engine (`buildCard` fails just that rule); this is the
 * backstop.
 */
function assertCard(card: Card, index: number): void {
  const where = `card[${index}]`;
  const fail = (message: string): never => {
    throw new Error(`${where}: ${message}`);
  };
  if (typeof card.summary !== 'string' || card.summary === '') {
    fail('summary is required');
  }
  // Measured in UTF-16 code units, as `shortenSummary` measures it. finalizeCards shortens a
  // longer one before this check (fitSummary); reaching this is a bug in this file.
  if (card.summary.length >= SUMMARY_LIMIT) {
    fail(`summary must be shorter than ${SUMMARY_LIMIT} characters`);
  }
  if (!INDICATORS.has(card.indicator)) {
    fail('indicator must be info, warning or critical');
  }
  if (typeof card.source.label !== 'string' || card.source.label === '') {
    fail('source.label is required');
  }
  for (const field of ['url', 'icon'] as const) {
    const value = card.source[field];
    if (value !== undefined && !isAbsoluteHttpUrl(value)) {
      fail(`source.${field} must be an absolute URL`);
    }
  }
  card.overrideReasons?.forEach((reason, i) => {
    if (!reason.code || !reason.system || !reason.display) {
      fail(`overrideReasons[${i}] needs code, system and display`);
    }
  });
  card.links?.forEach((link, i) => {
    if (!link.label || !isAbsoluteHttpUrl(link.url) || !LINK_TYPES.has(link.type)) {
      fail(`links[${i}] needs a label, an absolute url and type absolute or smart`);
    }
    if (link.appContext !== undefined && link.type !== 'smart') {
      fail(`links[${i}].appContext is only allowed on smart links`);
    }
  });
  if (card.suggestions !== undefined) {
    if (card.selectionBehavior === undefined || !SELECTION_BEHAVIORS.has(card.selectionBehavior)) {
      fail('selectionBehavior must be at-most-one or any when there are suggestions');
    }
    const recommended = card.suggestions.filter((s) => s.isRecommended === true).length;
    if (card.selectionBehavior === 'at-most-one' && recommended > 1) {
      fail('at most one suggestion may be recommended under at-most-one');
    }
    card.suggestions.forEach((suggestion, i) => {
      if (!suggestion.label) {
        fail(`suggestions[${i}].label is required`);
      }
      suggestion.actions?.forEach((action, j) => {
        if (!ACTION_TYPES.has(action.type) || !action.description) {
          fail(
            `suggestions[${i}].actions[${j}] needs type create, update or delete and a description`,
          );
        }
        // A delete names its target (CDS Hooks 2.0); `Type/` would reach the EHR as a target.
        if (
          (action.type === 'delete' && action.resourceId === undefined) ||
          (action.resourceId !== undefined && !RELATIVE_REFERENCE.test(action.resourceId))
        ) {
          fail(`suggestions[${i}].actions[${j}].resourceId must be a relative reference Type/id`);
        }
        // A reference inside the resource must name something too (`Patient/` reached the EHR).
        const bad = action.resource === undefined ? undefined : findBadReference(action.resource);
        if (bad !== undefined) {
          fail(`suggestions[${i}].actions[${j}].resource${bad} must be a FHIR reference`);
        }
      });
    });
  }
}

/**
 * A summary of `SUMMARY_LIMIT` (140) characters or more, shortened as the engine shortens one
 * that interpolation made too long (`shortenSummary`; the template is not known here, so the
 * text is cut at its end, with `…`): the alert still goes. As in the engine, the rule's entry
 * in `trace` (when given and it has one) gets a PHI-free note, so the call counts a rule error
 * and logs at warn (server/cds-routes.ts). Anything but a string is left to `assertCard`.
 */
function fitSummary(summary: unknown, ruleId: string, trace: TraceEntry[] | undefined): unknown {
  if (typeof summary !== 'string' || summary.length < SUMMARY_LIMIT) {
    return summary;
  }
  const short = shortenSummary(summary);
  const note = `card.summary: ${summary.length} characters, shortened to ${short.length} before sending (must be under ${SUMMARY_LIMIT})`;
  const entry = trace?.find((t) => t.ruleId === ruleId);
  if (entry) {
    entry.error = entry.error === undefined ? note : `${entry.error}; ${note}`;
  }
  return short;
}

/**
 * Turns engine cards into CDS Hooks 2.0 cards: a fresh uuid per card and per suggestion,
 * `selectionBehavior` defaulted to `at-most-one` when there are suggestions (dropped when there
 * are none), `ruleId` dropped, every null/empty optional field removed deeply (FHIR resources
 * in actions lose only their `null` members), a summary of 140+ characters shortened (see
 * `fitSummary`: never a refusal of the call's cards).
 * @param newUuid uuid source; defaults to crypto.randomUUID.
 * @param trace the evaluation's trace: the entry of a card whose summary is shortened here gets
 *   a note in `error`, as the engine's does (rules/evaluate-core.ts `buildCard`).
 * @throws Error if a card breaks the 2.0 rules (summary missing, bad indicator, no
 *   source.label, override reason without display, bad link or action): a bug upstream, since
 *   packs are validated at load and the engine refuses, per rule, a required field that
 *   interpolation left empty or invalid (rules/evaluate-core.ts `buildCard`).
 */
export function finalizeCards(
  raw: RawCard[],
  newUuid: () => string = randomUUID,
  trace?: TraceEntry[],
): Card[] {
  return raw.map((rawCard, index) => {
    type Suggestion = NonNullable<Card['suggestions']>[number];
    type Action = NonNullable<Suggestion['actions']>[number];
    const suggestions = (rawCard.suggestions ?? []).map((suggestion): Suggestion => {
      // Resources are attached after stripping: they lose only their null members.
      const actions = (suggestion.actions ?? []).map((action): Action => {
        const built = stripEmpty({
          type: action.type,
          description: action.description,
          resourceId: action.resourceId,
        }) as Action;
        if (isJsonObject(action.resource)) {
          built.resource = stripNulls(action.resource) as Record<string, unknown>;
        }
        return built;
      });
      const built = stripEmpty({
        label: suggestion.label,
        uuid: newUuid(),
        isRecommended: suggestion.isRecommended,
      }) as Suggestion;
      if (actions.length > 0) {
        built.actions = actions;
      }
      return built;
    });
    const stripped = stripEmpty({
      summary: rawCard.summary,
      detail: rawCard.detail,
      indicator: rawCard.indicator,
      source: rawCard.source,
      overrideReasons: rawCard.overrideReasons,
      links: rawCard.links,
    }) as Partial<Card>;
    const card = {
      uuid: newUuid(),
      summary: fitSummary(stripped.summary, rawCard.ruleId, trace),
      ...(stripped.detail === undefined ? {} : { detail: stripped.detail }),
      indicator: stripped.indicator,
      // A card with no source fails the checks below with a clear message.
      source: stripped.source ?? { label: '' },
      ...(suggestions.length > 0
        ? { suggestions, selectionBehavior: rawCard.selectionBehavior ?? 'at-most-one' }
        : {}),
      ...(stripped.overrideReasons === undefined
        ? {}
        : { overrideReasons: stripped.overrideReasons }),
      ...(stripped.links === undefined ? {} : { links: stripped.links }),
    } as Card;
    assertCard(card, index);
    return card;
  });
}
