/**
 * validatePackInWorker: the same answer as validatePack (without tests) for valid and invalid
 * packs, from a one-off worker thread bounded in time and heap.
 */
import fs from 'node:fs';
import { expect } from 'chai';
import YAML from 'yaml';
import {
  PackLimitError,
  PackValidationError,
  parsePackText,
  validatePack,
  validatePackInWorker,
} from '../../rules/index.ts';
import { packLimitMessage } from '../../rules/pack-check.ts';
import type { CompiledPack } from '../../rules/index.ts';
import { readPackFile, SHIPPED_PACK_FILE } from '../../server/demo.ts';
import { generatedPack } from '../helpers/generated-pack.ts';
import { tinyPack } from '../helpers/packs.ts';

type Outcome =
  { valid: Pick<CompiledPack, 'id' | 'version' | 'hash' | 'pack'> } | { problems: unknown };

async function outcomeOf(run: () => Promise<CompiledPack>): Promise<Outcome> {
  try {
    const c = await run();
    return { valid: { id: c.id, version: c.version, hash: c.hash, pack: c.pack } };
  } catch (err) {
    if (err instanceof PackValidationError) {
      expect(err).to.not.be.instanceOf(PackLimitError);
      return { problems: err.problems };
    }
    throw err;
  }
}

function badPack(): Record<string, unknown> {
  const bad = tinyPack('bad');
  const rules = bad.rules as Array<Record<string, unknown>>;
  rules[0]!.when = '%draftOrders.entry.existss()';
  rules[1]!.service = 'no-such-service';
  return bad;
}

/** Ten levels of ten aliases each (10^10 nodes if expanded). */
function aliasBomb(): string {
  const lines: string[] = [];
  for (let i = 1; i <= 10; i++) {
    const prev = i === 1 ? 'a' : `l${i - 1}`;
    lines.push(`l${i}: &l${i} [${Array.from({ length: 10 }, () => `*${prev}`).join(', ')}]`);
  }
  return `${lines.join('\n')}\n`;
}

function nested(depth: number): Record<string, unknown> {
  let v: Record<string, unknown> = {};
  for (let i = 0; i < depth; i++) {
    v = { a: v };
  }
  return { ...tinyPack('deep'), deep: v };
}

describe('validatePackInWorker', function () {
  this.timeout(120_000);

  const cases: Array<[string, () => unknown]> = [
    ['the shipped pack', () => readPackFile(SHIPPED_PACK_FILE)],
    [
      'the PlanDefinition example',
      () =>
        parsePackText(
          fs.readFileSync('rules/packs/plandefinition-example/plandefinition.json', 'utf8'),
          'json',
        ),
    ],
    ['a tiny pack', () => tinyPack('tiny')],
    ['a pack with an unknown function and an unknown service', badPack],
    ['a __proto__ key', () => parsePackText('{"id": "x", "rules": [{"__proto__": {"a": 1}}]}')],
    ['a constructor key', () => ({ ...tinyPack('ctor'), constructor: { prototype: 1 } })],
    ['a string', () => 'not a pack'],
    ['an array', () => [tinyPack('a')]],
    ['an object nested 300 deep', () => nested(300)],
    ['an empty object', () => ({})],
  ];
  for (const [name, make] of cases) {
    it(`answers ${name} as validatePack does`, async () => {
      const inThread = await outcomeOf(() => validatePack(make(), { runTests: false }));
      const inWorker = await outcomeOf(() => validatePackInWorker({ raw: make() }));
      expect(inWorker).to.deep.equal(inThread);
    });
  }

  const texts: Array<[string, string, 'json' | 'yaml' | undefined]> = [
    ['the shipped pack as YAML', fs.readFileSync(SHIPPED_PACK_FILE, 'utf8'), 'yaml'],
    ['a tiny pack as JSON', JSON.stringify(tinyPack('tiny-json')), 'json'],
    ['a tiny pack as YAML', YAML.stringify(tinyPack('tiny-yaml')), 'yaml'],
    ['a bad pack as YAML, format sniffed', YAML.stringify(badPack()), undefined],
    ['a JSON syntax error', '{"id": "x",\n  "version": }', 'json'],
    ['a YAML syntax error', 'id: x\nrules: [\n  - a: b\n', 'yaml'],
    ['a YAML duplicate key', 'id: x\nid: y\n', 'yaml'],
    ['a YAML alias bomb', `a: &a [x, x, x, x, x, x, x, x, x, x]\n${aliasBomb()}`, 'yaml'],
    ['an empty document', '', 'json'],
  ];
  for (const [name, text, format] of texts) {
    it(`answers ${name} as parsePackText and validatePack do`, async () => {
      const inThread = await outcomeOf(() =>
        validatePack(parsePackText(text, format), { runTests: false }),
      );
      const inWorker = await outcomeOf(() =>
        validatePackInWorker(format === undefined ? { text } : { text, format }),
      );
      expect(inWorker).to.deep.equal(inThread);
    });
  }

  it('returns a frozen pack', async () => {
    const c = await validatePackInWorker({ raw: tinyPack('frozen') });
    expect(Object.isFrozen(c)).to.equal(true);
    expect(Object.isFrozen(c.pack)).to.equal(true);
    expect(Object.isFrozen(c.pack.rules[0]!.card)).to.equal(true);
  });

  it('refuses a pack whose validation outlasts the time limit (PackLimitError time)', async () => {
    try {
      await validatePackInWorker({ raw: generatedPack('slow', 3000) }, { timeoutMs: 50 });
      expect.fail('accepted');
    } catch (err) {
      expect(err).to.be.instanceOf(PackLimitError);
      expect((err as PackLimitError).limit).to.equal('time');
      expect((err as PackLimitError).problems).to.deep.equal([
        { path: '(pack)', message: packLimitMessage('time', 50) },
      ]);
    }
  });

  it('refuses a pack whose validation needs more heap than the limit (PackLimitError memory)', async () => {
    try {
      // Its YAML (1.6 MB) takes over 96 MB to parse and validate; a worker starts in ~24 MB.
      const text = YAML.stringify(generatedPack('heavy', 3000));
      await validatePackInWorker({ text, format: 'yaml' }, { memoryMb: 40 });
      expect.fail('accepted');
    } catch (err) {
      expect(err).to.be.instanceOf(PackLimitError);
      expect((err as PackLimitError).limit).to.equal('memory');
      expect((err as PackLimitError).problems).to.deep.equal([
        { path: '(pack)', message: packLimitMessage('memory', 40) },
      ]);
    }
  });

  it('refuses limits that are not positive', async () => {
    for (const opts of [{ timeoutMs: 0 }, { memoryMb: -1 }, { timeoutMs: Number.NaN }]) {
      try {
        await validatePackInWorker({ raw: tinyPack('x') }, opts);
        expect.fail('accepted');
      } catch (err) {
        expect(err).to.be.instanceOf(RangeError);
      }
    }
  });
});
