/**
 * Shared input checks for hook, prefetch and feedback bodies: JSON field paths, hostile keys,
 * and turning a zod failure into a HookRequestError that names the field.
 */
import type { z } from 'zod';
import { HookRequestError } from './errors.ts';

/** Keys that could reach an object's prototype if the value were ever merged or assigned. */
const FORBIDDEN_KEYS: ReadonlySet<string> = new Set(['__proto__', 'constructor', 'prototype']);

/** Nesting deeper than this is refused (FHIR resources stay far below it). */
const MAX_DEPTH = 64;

/** True for a JSON object (not an array, not null). */
export function isJsonObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/**
 * Formats a JSON path for error messages: `context.selections[1]`, `prefetch.hemoglobin-a1c`.
 * Keys that are not plain names are quoted and cut to 40 characters.
 */
export function formatField(base: string, path: readonly PropertyKey[]): string {
  let out = base;
  for (const part of path) {
    if (typeof part === 'number') {
      out += `[${part}]`;
    } else {
      const key = String(part);
      const segment = /^[A-Za-z0-9_$.-]{1,64}$/.test(key) ? key : JSON.stringify(key.slice(0, 40));
      out += out === '' ? segment : `.${segment}`;
    }
  }
  return out === '' ? 'body' : out;
}

/**
 * Refuses `__proto__`, `constructor` and `prototype` keys anywhere in a parsed JSON value, and
 * nesting deeper than 64 levels. We reject (400) rather than copy: no legitimate CDS Hooks or
 * FHIR JSON uses these names, and refusing keeps every later merge or spread safe.
 * @throws HookRequestError naming the offending key's path (e.g. `context.__proto__`).
 */
export function assertSafeJsonKeys(value: unknown, base = ''): void {
  // Every body is checked, and nearly all pass: a walk that keeps no path answers first (a
  // hook body is ~30 KiB of FHIR; it halved the check's time), and only a refused body is
  // walked again to name the offending path.
  if (isSafeJson(value, 0)) {
    return;
  }
  // Depth-first with one shared path (pushed and popped). Recursion is bounded by MAX_DEPTH.
  const path: PropertyKey[] = [];
  const walk = (node: unknown): void => {
    if (typeof node !== 'object' || node === null) {
      return;
    }
    if (path.length > MAX_DEPTH) {
      throw new HookRequestError(
        formatField(base, path),
        `nesting deeper than ${MAX_DEPTH} levels`,
      );
    }
    if (Array.isArray(node)) {
      for (let i = 0; i < node.length; i += 1) {
        path.push(i);
        walk(node[i]);
        path.pop();
      }
      return;
    }
    for (const key of Object.keys(node)) {
      if (FORBIDDEN_KEYS.has(key)) {
        throw new HookRequestError(formatField(base, [...path, key]), 'forbidden key');
      }
      path.push(key);
      walk((node as Record<string, unknown>)[key]);
      path.pop();
    }
  };
  walk(value);
}

/**
 * True if `node` has no forbidden key and no nesting deeper than MAX_DEPTH (`depth`: its own).
 * `for...in` lists a parsed object's own keys (`__proto__` included) without making an array;
 * it would also list inherited enumerable keys, of which JSON values have none (and any would
 * only make the answer stricter: the naming walk then finds nothing and passes).
 */
function isSafeJson(node: unknown, depth: number): boolean {
  if (typeof node !== 'object' || node === null) {
    return true;
  }
  if (depth > MAX_DEPTH) {
    return false;
  }
  if (Array.isArray(node)) {
    for (let i = 0; i < node.length; i += 1) {
      if (!isSafeJson(node[i], depth + 1)) {
        return false;
      }
    }
    return true;
  }
  for (const key in node) {
    if (FORBIDDEN_KEYS.has(key) || !isSafeJson((node as Record<string, unknown>)[key], depth + 1)) {
      return false;
    }
  }
  return true;
}

function valueAt(root: unknown, path: readonly PropertyKey[]): unknown {
  let current = root;
  for (const part of path) {
    if (typeof current !== 'object' || current === null) {
      return undefined;
    }
    current = (current as Record<PropertyKey, unknown>)[part];
  }
  return current;
}

/**
 * Parses `value` with `schema`; on failure throws a HookRequestError for the first issue.
 * Messages never echo the input (it may hold PHI or tokens).
 * @throws HookRequestError naming the field under `base`.
 */
export function parseWithSchema<T extends z.ZodType>(
  schema: T,
  value: unknown,
  base: string,
): z.output<T> {
  const result = schema.safeParse(value);
  if (result.success) {
    return result.data;
  }
  const issue = result.error.issues[0];
  if (issue === undefined) {
    throw new HookRequestError(formatField(base, []), 'is invalid');
  }
  const field = formatField(base, issue.path);
  if (issue.code === 'invalid_type') {
    const missing = valueAt(value, issue.path) === undefined;
    throw new HookRequestError(
      field,
      missing ? 'is required' : `must be ${article(issue.expected)}`,
    );
  }
  throw new HookRequestError(field, issue.message);
}

function article(expected: string): string {
  return /^[aeiou]/.test(expected) ? `an ${expected}` : `a ${expected}`;
}
