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
    } finally {
      await evaluator.close();
    }
  });
});
