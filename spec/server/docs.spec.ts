import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'chai';
import { createEvaluator, parsePackText, validatePack } from '../../rules/index.ts';

/** The examples newcomers copy from the docs must keep working. */
describe('docs', () => {
  it('docs/authoring-packs.md: the example pack validates and passes its own test', async () => {
    const text = fs.readFileSync('docs/authoring-packs.md', 'utf8');
    const yaml = /```yaml\n([\s\S]*?)```/.exec(text)?.[1];
    expect(yaml, 'a yaml block').to.be.a('string');
    const evaluator = createEvaluator();
    try {
      await evaluator.ready();
      // The doc says: save it at the top of a checkout; test paths are relative to that.
      const compiled = await validatePack(parsePackText(yaml ?? '', 'yaml'), {
        baseDir: path.resolve('.'),
        evaluator,
      });
      expect(compiled.id).to.equal('my-pack');
      expect(compiled.pack.tests).to.have.length(1);
      // Its `pack eval` example: the request the doc names fires the rule, summary complete.
      const request = JSON.parse(
        fs.readFileSync('docs/examples/order-sign-naproxen-on-warfarin.json', 'utf8'),
      ) as {
        hook: string;
        hookInstance: string;
        context: Record<string, unknown>;
        prefetch: Record<string, unknown>;
      };
      expect(text).to.include('--request docs/examples/order-sign-naproxen-on-warfarin.json');
      const result = await evaluator.evaluate(compiled, 'my-pack-order-sign', {
        ...request,
        now: new Date('2020-05-11T12:00:00Z'),
      });
      expect(result.cards.map((c) => c.summary)).to.deep.equal([
        'Warfarin + Naproxen sodium 220 MG Oral Tablet',
      ]);
    } finally {
      await evaluator.close();
    }
  });
});
