import { expect } from 'chai';
import fc from 'fast-check';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { z } from 'zod';
import {
  canonicalJson,
  PackValidationError,
  packHash,
  packToJson,
  packToYaml,
  parsePackText,
} from '../../rules/index.ts';
import type { PackProblem, RulePack } from '../../rules/index.ts';
import { PackSchema } from '../../rules/pack-schema.ts';

const PACKS = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../fixtures/packs');
const fullYaml = fs.readFileSync(path.join(PACKS, 'full-pack.yaml'), 'utf8');

function problemsOf(fn: () => unknown): PackProblem[] {
  try {
    fn();
  } catch (err) {
    expect(err).to.be.instanceOf(PackValidationError);
    return (err as PackValidationError).problems;
  }
  expect.fail('expected a PackValidationError');
}

/** Every field path the schema defines, e.g. `rules[].card.links[].appContext`. */
function schemaPaths(schema: z.ZodType, prefix: string, out: Set<string>): void {
  const def = (schema as unknown as { _zod: { def: Record<string, unknown> } })._zod.def;
  switch (def.type) {
    case 'optional':
    case 'nullable':
      schemaPaths(def.innerType as z.ZodType, prefix, out);
      return;
    case 'array':
      schemaPaths(def.element as z.ZodType, `${prefix}[]`, out);
      return;
    case 'record':
      out.add(`${prefix}.*`);
      schemaPaths(def.valueType as z.ZodType, `${prefix}.*`, out);
      return;
    case 'object':
      for (const [key, child] of Object.entries(def.shape as Record<string, z.ZodType>)) {
        const p = prefix === '' ? key : `${prefix}.${key}`;
        out.add(p);
        // Free-form FHIR content (resources, contexts, prefetch) is not part of the pack schema.
        if (
          !['resource', 'context', 'prefetch', 'draftOrders'].includes(key) ||
          p === 'services[].prefetch'
        ) {
          schemaPaths(child, p, out);
        }
      }
      return;
    default:
      return;
  }
}

function valuePaths(
  value: unknown,
  prefix: string,
  out: Set<string>,
  schemaSet: Set<string>,
): void {
  if (Array.isArray(value)) {
    for (const v of value) {
      valuePaths(v, `${prefix}[]`, out, schemaSet);
    }
  } else if (typeof value === 'object' && value !== null) {
    for (const [k, v] of Object.entries(value)) {
      const named = prefix === '' ? k : `${prefix}.${k}`;
      const p = schemaSet.has(named) ? named : `${prefix}.*`;
      if (!schemaSet.has(p)) {
        continue;
      }
      out.add(p);
      valuePaths(v, p, out, schemaSet);
    }
  }
}

describe('rules: pack format (JSON and YAML)', () => {
  it('the full test pack uses every field of the schema', () => {
    const fields = new Set<string>();
    schemaPaths(PackSchema, '', fields);
    const used = new Set<string>();
    valuePaths(parsePackText(fullYaml), '', used, fields);
    const recordKeys = [...fields].filter((f) => f.endsWith('.*'));
    const missing = [...fields].filter((f) => !used.has(f) && !recordKeys.includes(f));
    expect(missing).to.deep.equal([]);
    expect(fields.size).to.be.greaterThan(60);
  });

  it('round-trips YAML -> JSON -> YAML to the same canonical pack and hash', () => {
    const fromYaml = parsePackText(fullYaml) as RulePack;
    const json = packToJson(fromYaml);
    const fromJson = parsePackText(json) as RulePack;
    const yaml = packToYaml(fromJson);
    const again = parsePackText(yaml) as RulePack;
    expect(canonicalJson(fromJson)).to.equal(canonicalJson(fromYaml));
    expect(canonicalJson(again)).to.equal(canonicalJson(fromYaml));
    expect(packHash(again)).to.equal(packHash(fromYaml));
    expect(packHash(fromJson)).to.equal(packHash(fromYaml));
    // Explicit formats agree with auto-detection.
    expect(parsePackText(json, 'json')).to.deep.equal(fromJson);
    expect(parsePackText(yaml, 'yaml')).to.deep.equal(again);
  });

  it('keeps multi-line markdown, quotes and {{ }} exactly through YAML', () => {
    const pack = parsePackText(fullYaml) as RulePack;
    const detail = pack.rules[0]?.card.detail ?? '';
    expect(detail).to.contain('\n').and.to.contain('{{ %activeNsaid.authoredOn');
    const back = parsePackText(packToYaml(pack)) as RulePack;
    expect(back.rules[0]?.card.detail).to.equal(detail);
    expect(back.rules[0]?.card.links?.[1]?.appContext).to.equal('{"patient":"{{ %patient.id }}"}');
  });

  it('hashes canonical JSON: key order does not matter, content does', () => {
    const a = parsePackText(fullYaml) as RulePack;
    const reordered = Object.fromEntries(Object.entries(a).reverse()) as unknown as RulePack;
    expect(packHash(reordered)).to.equal(packHash(a));
    expect(packHash(a)).to.match(/^[0-9a-f]{64}$/);
    const changed = { ...a, title: `${a.title}.` };
    expect(packHash(changed)).to.not.equal(packHash(a));
  });

  it('round-trips arbitrary strings in every text position through YAML (property)', () => {
    const base = parsePackText(fullYaml) as RulePack;
    fc.assert(
      fc.property(
        fc.string({ unit: 'grapheme', maxLength: 80 }),
        fc.string({ maxLength: 40 }),
        (detail, title) => {
          const pack: RulePack = structuredClone(base);
          pack.title = title;
          const rule = pack.rules[0];
          if (rule) {
            rule.card.detail = detail;
          }
          const back = parsePackText(packToYaml(pack), 'yaml') as RulePack;
          expect(packHash(back)).to.equal(packHash(pack));
        },
      ),
      { numRuns: 200 },
    );
  });

  it('reports a YAML syntax error with line and column, path (document)', () => {
    expect(problemsOf(() => parsePackText('id: x\nservices: [a, b\nrules: []\n'))).to.deep.equal([
      {
        path: '(document)',
        message:
          'YAML syntax error at line 3, column 1: Flow sequence in block collection must be sufficiently indented and end with a ]',
      },
    ]);
  });

  it('reports a duplicate YAML key', () => {
    expect(problemsOf(() => parsePackText('id: a\nversion: 1.0.0\nid: b\n'))).to.deep.equal([
      {
        path: '(document)',
        message: 'YAML syntax error at line 3, column 1: Map keys must be unique',
      },
    ]);
  });

  it('reports a JSON syntax error with line and column', () => {
    expect(problemsOf(() => parsePackText('{\n  "id": "x",\n  "version": 1.0.0\n}'))).to.deep.equal(
      [
        {
          path: '(document)',
          message:
            "JSON syntax error at line 3, column 17: Expected ',' or '}' after property value",
        },
      ],
    );
  });

  it('refuses an empty document', () => {
    expect(problemsOf(() => parsePackText('  \n# nothing\n'))).to.deep.equal([
      { path: '(document)', message: 'the document is empty' },
    ]);
  });

  it('does not expand a YAML alias bomb', () => {
    const bomb = ['a: &a ["x","x","x","x","x","x","x","x","x","x"]'];
    for (let i = 0; i < 8; i++) {
      const prev = String.fromCharCode(97 + i);
      const next = String.fromCharCode(98 + i);
      bomb.push(`${next}: &${next} [${Array(10).fill(`*${prev}`).join(',')}]`);
    }
    expect(problemsOf(() => parsePackText(bomb.join('\n')))).to.deep.equal([
      {
        path: '(document)',
        message: 'YAML error: Excessive alias count indicates a resource exhaustion attack',
      },
    ]);
  });
});
