// @ts-check
// ESLint's config, kept out of the top level (the product's folders only): `npm run lint` passes
// it with `--config`, so `files` and `ignores` are relative to the working directory, the
// package root. Editors: point ESLint's overrideConfigFile here (README, "Tests").
import path from 'node:path';
import tseslint from 'typescript-eslint';

const folders = ['server', 'hooks', 'rules', 'fhir-profiles', 'tenants'];

/**
 * Folder boundaries (DESIGN.md "Layout"): a folder is reached only through its index.ts,
 * and domain folders never import the HTTP edge or a folder they may not depend on.
 */
const mayImport = {
  server: ['hooks', 'rules', 'fhir-profiles', 'tenants'],
  hooks: ['rules', 'fhir-profiles'],
  rules: ['fhir-profiles'],
  'fhir-profiles': [],
  tenants: ['fhir-profiles', 'rules'],
};

/** @param {string} folder */
function boundaryPatterns(folder) {
  const patterns = [];
  for (const other of folders) {
    if (other === folder) continue;
    const allowed = /** @type {Record<string,string[]>} */ (mayImport)[folder]?.includes(other);
    if (allowed) {
      patterns.push({
        regex: `^(\\.\\./)+${other}/(?!index\\.ts$).+`,
        message: `Import ${other}/ only through ${other}/index.ts.`,
      });
    } else {
      patterns.push({
        regex: `^(\\.\\./)+${other}/`,
        message: `${folder}/ may not import ${other}/ (see DESIGN.md, Layout).`,
      });
    }
  }
  if (folder !== 'server') {
    patterns.push({ regex: '^express$', message: 'Only server/ imports Express.' });
  }
  if (folder === 'rules' || folder === 'fhir-profiles' || folder === 'hooks') {
    patterns.push({ regex: '^sequelize$', message: 'The clinical core never imports Sequelize.' });
  }
  return patterns;
}

export default tseslint.config(
  {
    ignores: [
      'node_modules/**',
      'var/**',
      'docs/**',
      'spec/fixtures/**',
      '**/*.mjs',
      '.ci/eslint.config.js',
    ],
  },
  ...tseslint.configs.strictTypeChecked,
  {
    languageOptions: {
      parserOptions: {
        projectService: true,
        tsconfigRootDir: path.resolve(import.meta.dirname, '..'),
      },
    },
    rules: {
      '@typescript-eslint/no-floating-promises': 'error',
      '@typescript-eslint/no-misused-promises': 'error',
      '@typescript-eslint/switch-exhaustiveness-check': 'error',
      '@typescript-eslint/consistent-type-imports': 'error',
      '@typescript-eslint/no-explicit-any': 'error',
      '@typescript-eslint/restrict-template-expressions': [
        'error',
        { allowNumber: true, allowBoolean: true },
      ],
      '@typescript-eslint/no-unused-vars': [
        'error',
        { argsIgnorePattern: '^_', varsIgnorePattern: '^_' },
      ],
      eqeqeq: 'error',
      curly: 'error',
      'no-restricted-properties': [
        'error',
        { object: 'process', property: 'env', message: 'Only server/config.ts reads process.env.' },
      ],
    },
  },
  ...folders.map((folder) => ({
    files: [`${folder}/**/*.ts`],
    rules: {
      'no-restricted-imports': ['error', { patterns: boundaryPatterns(folder) }],
    },
  })),
  {
    files: ['server/config.ts', 'spec/**/*.ts', 'bench/**/*.ts'],
    rules: { 'no-restricted-properties': 'off' },
  },
  {
    files: ['spec/**/*.ts'],
    rules: {
      '@typescript-eslint/no-unused-expressions': 'off',
      '@typescript-eslint/no-non-null-assertion': 'off',
      '@typescript-eslint/no-unsafe-member-access': 'off',
      '@typescript-eslint/no-unsafe-assignment': 'off',
      '@typescript-eslint/no-unsafe-argument': 'off',
      '@typescript-eslint/no-unsafe-call': 'off',
    },
  },
);
