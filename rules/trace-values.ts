/**
 * Value summaries for the rule author's trace (`pack eval --trace`, a failing `pack test`, the
 * playground): what a `let` held and which top-level `and`-operand of a rule's `when` came out
 * empty or false. Computed only when an author tool asks for it (`traceValues`); never on the
 * live hook path, whose traces carry statuses and times only (values are patient data).
 */
import fhirpath from 'fhirpath';

/** A summary is cut to this many characters. */
export const SUMMARY_CHARS = 120;
/** Items shown before `…`. */
const SHOWN_ITEMS = 3;

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** A Coding as `system|code` (either part may be missing). */
function codingText(c: Record<string, unknown>): string {
  const system = typeof c.system === 'string' ? c.system : '';
  const code = typeof c.code === 'string' ? c.code : '';
  return `${system}|${code}`;
}

function firstCoding(cc: unknown): Record<string, unknown> | undefined {
  if (isRecord(cc) && Array.isArray(cc.coding)) {
    const first = (cc.coding as unknown[]).find(isRecord);
    return first;
  }
  return undefined;
}

/** Where a resource's own code is, in this order; else the first top-level CodeableConcept. */
const CODE_KEYS = ['code', 'medicationCodeableConcept', 'vaccineCode', 'type', 'category'];

function resourceCoding(r: Record<string, unknown>): Record<string, unknown> | undefined {
  for (const key of CODE_KEYS) {
    const v = r[key];
    const c = firstCoding(Array.isArray(v) ? (v as unknown[])[0] : v);
    if (c) {
      return c;
    }
  }
  for (const v of Object.values(r)) {
    const c = firstCoding(v);
    if (c) {
      return c;
    }
  }
  return undefined;
}

/** One item: a resource as `Type/id system|code`, primitives as they are, strings quoted. */
function itemSummary(item: unknown): string {
  if (typeof item === 'string') {
    return `'${item}'`;
  }
  if (typeof item === 'number' || typeof item === 'boolean' || typeof item === 'bigint') {
    return String(item);
  }
  if (item === null || item === undefined) {
    return 'null';
  }
  if (Array.isArray(item)) {
    return `[${item.length}]`;
  }
  if (typeof item !== 'object') {
    return typeof item;
  }
  const r = item as Record<string, unknown>;
  if (typeof r.resourceType === 'string') {
    const c = resourceCoding(r);
    const id = typeof r.id === 'string' ? r.id : '(no id)';
    return `${r.resourceType}/${id}${c ? ` ${codingText(c)}` : ''}`;
  }
  const cc = firstCoding(r);
  if (cc) {
    return codingText(cc);
  }
  if (typeof r.code === 'string' || typeof r.system === 'string') {
    return codingText(r);
  }
  if (typeof r.value === 'number' || typeof r.value === 'string') {
    const unit =
      typeof r.unit === 'string' ? r.unit : typeof r.code === 'string' ? r.code : undefined;
    return unit ? `${String(r.value)} ${unit}` : String(r.value);
  }
  if (typeof r.reference === 'string') {
    return r.reference;
  }
  let json: string | undefined;
  try {
    json = JSON.stringify(r);
  } catch {
    json = undefined;
  }
  return json ?? 'object';
}

const DATE_TYPES = new Set(['date', 'dateTime', 'instant', 'time']);

/**
 * One item of a raw let value (fhirpath.js keeps FHIR types there): an FP date or time as its
 * FHIRPath text, a resource node as its JSON value (a date-typed one unquoted).
 */
function rawItemSummary(item: unknown): string {
  if (typeof item === 'object' && item !== null) {
    const name = (item as { constructor?: { name?: unknown } }).constructor?.name;
    if (typeof name === 'string' && name.startsWith('FP_')) {
      // FP_Date, FP_DateTime, FP_Time, FP_Quantity print as FHIRPath literals.
      const text: unknown = (item as { toString(): unknown }).toString();
      return typeof text === 'string' ? text : name;
    }
    if ('fhirNodeDataType' in item && 'data' in item) {
      const node = item;
      if (
        typeof node.data === 'string' &&
        typeof node.fhirNodeDataType === 'string' &&
        DATE_TYPES.has(node.fhirNodeDataType)
      ) {
        return node.data;
      }
      let plain: unknown;
      try {
        plain = fhirpath.resolveInternalTypes(item);
      } catch {
        plain = node.data;
      }
      return itemSummary(plain);
    }
  }
  return itemSummary(item);
}

/**
 * `0 items`, `1 item: MedicationRequest/x http://www.nlm.nih.gov/research/umls/rxnorm|1234`,
 * `5 items: 'a', 'b', 'c', …`: the count and the first few items of a collection, at most
 * {@link SUMMARY_CHARS} characters. For the author tools only (it shows patient data).
 */
export function summarizeValue(value: unknown): string {
  const items = Array.isArray(value) ? (value as unknown[]) : value === undefined ? [] : [value];
  const head = `${items.length} item${items.length === 1 ? '' : 's'}`;
  if (items.length === 0) {
    return head;
  }
  const shown = items.slice(0, SHOWN_ITEMS).map(rawItemSummary);
  if (items.length > SHOWN_ITEMS) {
    shown.push('…');
  }
  const text = `${head}: ${shown.join(', ')}`;
  return text.length > SUMMARY_CHARS ? `${text.slice(0, SUMMARY_CHARS - 1)}…` : text;
}

const WORD = /[A-Za-z0-9_]/;

/**
 * The top-level `and`-operands of an expression (outside parentheses, brackets, braces,
 * strings, quoted identifiers and comments), trimmed; undefined when there are fewer than two,
 * or when a top-level `or`, `xor` or `implies` (which bind looser than `and`) is present.
 */
export function splitTopLevelAnd(expr: string): string[] | undefined {
  const cuts: Array<[number, number]> = [];
  let depth = 0;
  let i = 0;
  while (i < expr.length) {
    const ch = expr[i] as string;
    if (ch === "'" || ch === '`' || ch === '"') {
      i++;
      while (i < expr.length && expr[i] !== ch) {
        i += expr[i] === '\\' ? 2 : 1;
      }
      i++;
      continue;
    }
    if (ch === '/' && expr[i + 1] === '/') {
      while (i < expr.length && expr[i] !== '\n') {
        i++;
      }
      continue;
    }
    if (ch === '/' && expr[i + 1] === '*') {
      const end = expr.indexOf('*/', i + 2);
      i = end < 0 ? expr.length : end + 2;
      continue;
    }
    if (ch === '(' || ch === '[' || ch === '{') {
      depth++;
    } else if (ch === ')' || ch === ']' || ch === '}') {
      depth--;
    } else if (WORD.test(ch) && (i === 0 || !WORD.test(expr[i - 1] as string))) {
      let j = i;
      while (j < expr.length && WORD.test(expr[j] as string)) {
        j++;
      }
      const word = expr.slice(i, j);
      // A keyword, not a path step (`.and`) or a variable (`%and`).
      const prev = expr.slice(0, i).trimEnd().slice(-1);
      if (depth === 0 && prev !== '.' && prev !== '%') {
        if (word === 'and') {
          cuts.push([i, j]);
        } else if (word === 'or' || word === 'xor' || word === 'implies') {
          return undefined;
        }
      }
      i = j;
      continue;
    }
    i++;
  }
  if (cuts.length === 0) {
    return undefined;
  }
  const parts: string[] = [];
  let from = 0;
  for (const [start, end] of cuts) {
    parts.push(expr.slice(from, start).trim());
    from = end;
  }
  parts.push(expr.slice(from).trim());
  return parts.some((p) => p === '') ? undefined : parts;
}
