import { expect } from 'chai';
import { PackValidationError, parsePackText, validatePackInWorker } from '../../rules/index.ts';
import type { PackProblem } from '../../rules/index.ts';

function problemsOf(fn: () => unknown): PackProblem[] {
  try {
    fn();
  } catch (err) {
    expect(err).to.be.instanceOf(PackValidationError);
    return (err as PackValidationError).problems;
  }
  expect.fail('expected a PackValidationError');
}

/** A pack whose first key is indented by mistake: every token after it is an error. */
const INDENTED_FIRST = [
  '# a comment',
  '',
  '  id: my-pack',
  'version: 1.0.0',
  'title: T',
  'publisher: P',
  'description: D',
  'services:',
  ...Array.from({ length: 200 }, (_, i) => `  - { id: s${i}, hook: order-sign, description: x }`),
  'rules: []',
  '',
].join('\n');

describe('rules: YAML syntax errors', () => {
  it('reports only the first few YAML errors, then how many more there were', () => {
    const problems = problemsOf(() => parsePackText(INDENTED_FIRST, 'yaml'));
    expect(problems.length).to.be.at.most(6);
    expect(problems.every((p) => p.path === '(document)')).to.equal(true);
    const last = problems[problems.length - 1]?.message ?? '';
    expect(last).to.match(
      /^\.\.\. and \d+ more YAML syntax errors \(often caused by the first one: fix it and check again\)$/,
    );
  });

  it('points at an indented first key', () => {
    const problems = problemsOf(() => parsePackText(INDENTED_FIRST, 'yaml'));
    expect(problems[0]?.message).to.match(
      /^YAML syntax error at line 4, column 1: .*; line 3 \(the first key\) is indented by 2 spaces: top-level keys start at column 1$/,
    );
  });

  it('keeps every error when there are few', () => {
    const problems = problemsOf(() => parsePackText('id: a\nversion: 1.0.0\nid: b\n'));
    expect(problems).to.deep.equal([
      {
        path: '(document)',
        message: 'YAML syntax error at line 3, column 1: Map keys must be unique',
      },
    ]);
  });

  it('gives an upload (validatePackInWorker) the same problems', async () => {
    const expected = problemsOf(() => parsePackText(INDENTED_FIRST, 'yaml'));
    try {
      await validatePackInWorker({ text: INDENTED_FIRST, format: 'yaml' });
      expect.fail('expected a PackValidationError');
    } catch (err) {
      expect(err).to.be.instanceOf(PackValidationError);
      expect((err as PackValidationError).problems).to.deep.equal(expected);
    }
  });
});
