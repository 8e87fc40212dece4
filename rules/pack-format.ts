/**
 * The text forms of a pack (JSON and YAML, same schema), its canonical JSON and content hash.
 */
import { createHash } from 'node:crypto';
import { parseDocument, stringify } from 'yaml';
import { PackValidationError } from './errors.ts';
import type { RulePack } from './types.ts';

function lineColumn(text: string, offset: number): { line: number; column: number } {
  let line = 1;
  let lineStart = 0;
  for (let i = 0; i < offset && i < text.length; i++) {
    if (text.charCodeAt(i) === 10) {
      line++;
      lineStart = i + 1;
    }
  }
  return { line, column: offset - lineStart + 1 };
}

function parseJsonText(text: string): unknown {
  try {
    return JSON.parse(text) as unknown;
  } catch (err) {
    const msg = err instanceof Error ? err.message : 'invalid JSON';
    const m = /at position (\d+)/.exec(msg);
    const where = m?.[1] !== undefined ? lineColumn(text, Number(m[1])) : undefined;
    // V8 messages may quote the text; keep only the grammar part.
    const reason = msg
      .replace(/\s*in JSON at position \d+.*$/s, '')
      .replace(/^.*?"\s*is not valid JSON$/s, 'is not valid JSON');
    throw new PackValidationError([
      {
        path: '(document)',
        message: where
          ? `JSON syntax error at line ${where.line}, column ${where.column}: ${reason}`
          : `JSON syntax error: ${reason}`,
      },
    ]);
  }
}

/**
 * YAML syntax errors reported per document. After one mistake (an indented first key) the
 * parser reports every later token, thousands of errors that bury the first one: the others
 * are only counted (`PackValidationError.total`).
 */
export const YAML_ERRORS_SHOWN = 5;

/**
 * A hint for the usual cause the parser cannot name: the document's first key indented (every
 * key after it then looks misplaced; the parser's first error points at the second key).
 */
function indentHint(text: string, errorLine: number): string {
  const lines = text.split('\n');
  for (let i = 0; i < lines.length && i + 1 < errorLine; i++) {
    const line = lines[i] ?? '';
    const content = line.trimStart();
    if (content === '' || content.startsWith('#') || content.startsWith('---')) {
      continue;
    }
    const indent = line.length - content.length;
    return indent > 0
      ? `; line ${i + 1} (the first key) is indented by ${indent} ${indent === 1 ? 'space' : 'spaces'}: top-level keys start at column 1`
      : '';
  }
  return '';
}

function parseYamlText(text: string): unknown {
  const doc = parseDocument(text, { uniqueKeys: true, prettyErrors: true, schema: 'core' });
  if (doc.errors.length > 0) {
    const problems = doc.errors.slice(0, YAML_ERRORS_SHOWN).map((e, i) => {
      const at = e.linePos?.[0];
      const reason =
        e.message.split('\n')[0]?.replace(/\s+at line \d+, column \d+:?\s*$/, '') ?? e.code;
      const hint = i === 0 && at ? indentHint(text, at.line) : '';
      return {
        path: '(document)',
        message: at
          ? `YAML syntax error at line ${at.line}, column ${at.col}: ${reason}${hint}`
          : `YAML syntax error: ${reason}`,
      };
    });
    // The rest are counted, not listed (nor listed as a "problem" saying how many: a count of
    // problems must count problems); the error's message says how many are shown.
    throw new PackValidationError(problems, { total: doc.errors.length });
  }
  try {
    return doc.toJS({ maxAliasCount: 100 }) as unknown;
  } catch (err) {
    const reason = err instanceof Error ? err.message.split('\n')[0] : 'invalid document';
    throw new PackValidationError([{ path: '(document)', message: `YAML error: ${reason ?? ''}` }]);
  }
}

/**
 * Parses a pack's text as JSON or YAML. Without `format`, text whose first non-blank
 * character is `{` is JSON, anything else YAML.
 * @throws PackValidationError with path `(document)` and the line/column of a syntax error.
 */
export function parsePackText(text: string, format?: 'json' | 'yaml'): unknown {
  const fmt = format ?? (text.trimStart().startsWith('{') ? 'json' : 'yaml');
  const value = fmt === 'json' ? parseJsonText(text) : parseYamlText(text);
  if (value === null || value === undefined) {
    throw new PackValidationError([{ path: '(document)', message: 'the document is empty' }]);
  }
  return value;
}

function sortKeys(value: unknown): unknown {
  if (Array.isArray(value)) {
    return value.map(sortKeys);
  }
  if (typeof value === 'object' && value !== null) {
    const out: Record<string, unknown> = {};
    for (const key of Object.keys(value).sort()) {
      const v = (value as Record<string, unknown>)[key];
      if (v !== undefined) {
        Object.defineProperty(out, key, {
          value: sortKeys(v),
          enumerable: true,
          writable: true,
          configurable: true,
        });
      }
    }
    return out;
  }
  return value;
}

/** The canonical JSON of a value: object keys sorted, no whitespace, `undefined` dropped. */
export function canonicalJson(value: unknown): string {
  return JSON.stringify(sortKeys(value));
}

/** sha256 (hex) of the pack's canonical JSON: the identity of its exact content. */
export function packHash(pack: RulePack): string {
  return createHash('sha256').update(canonicalJson(pack), 'utf8').digest('hex');
}

/**
 * {@link packHash} one piece at a time: it yields after each top-level field, and after each
 * item of a top-level array (rules, tests, value sets), so that a caller can spread hashing a
 * big pack over several turns of the event loop. The same digest as `packHash`.
 */
export function* packHashSteps(pack: RulePack): Generator<undefined, string, undefined> {
  const hash = createHash('sha256');
  const fields = pack as unknown as Record<string, unknown>;
  hash.update('{', 'utf8');
  let first = true;
  for (const key of Object.keys(fields).sort()) {
    const value = fields[key];
    if (Array.isArray(value)) {
      hash.update(`${first ? '' : ','}${JSON.stringify(key)}:[`, 'utf8');
      for (const [i, item] of value.entries()) {
        // JSON.stringify writes null for an array item it cannot represent.
        hash.update(
          `${i > 0 ? ',' : ''}${(canonicalJson(item) as string | undefined) ?? 'null'}`,
          'utf8',
        );
        yield;
      }
      hash.update(']', 'utf8');
    } else {
      // undefined for a field JSON.stringify leaves out (undefined, a function).
      const text = canonicalJson(value) as string | undefined;
      if (text === undefined) {
        continue;
      }
      hash.update(`${first ? '' : ','}${JSON.stringify(key)}:${text}`, 'utf8');
      yield;
    }
    first = false;
  }
  hash.update('}', 'utf8');
  return hash.digest('hex');
}

/** The pack as pretty-printed JSON (keys in authoring order). */
export function packToJson(pack: RulePack): string {
  return `${JSON.stringify(pack, null, 2)}\n`;
}

/** The pack as YAML; parsing it back gives the same canonical pack and hash. */
export function packToYaml(pack: RulePack): string {
  return stringify(pack, { lineWidth: 0, aliasDuplicateObjects: false });
}
