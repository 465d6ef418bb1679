//! Chat template check: real templates pass, every escape technique of
//! CVE-2024-34359 and its variants is caught.

use super::*;

const DEEPSEEK_R1: &str = include_str!("fixtures/deepseek_r1.jinja");
const LLAMA3: &str = include_str!("fixtures/llama3.jinja");
const QWEN_CHATML: &str = include_str!("fixtures/qwen_chatml.jinja");

fn rules(src: &str) -> Vec<String> {
    check(src, "t").into_iter().map(|f| f.rule).collect()
}

#[test]
fn real_templates_pass() {
    for (name, src) in [
        ("deepseek-r1", DEEPSEEK_R1),
        ("llama-3", LLAMA3),
        ("qwen chatml", QWEN_CHATML),
        ("gguf test llama-3", crate::gguf::tests::LLAMA3_TEMPLATE),
        ("empty", ""),
    ] {
        assert_eq!(check(src, "t"), vec![], "{name}");
    }
}

#[test]
fn namespace_objects_are_fine_but_namespace_attributes_are_not() {
    assert_eq!(
        rules("{% set ns = namespace(x=1) %}{{ ns.x }}"),
        Vec::<String>::new()
    );
    assert_eq!(rules("{{ namespace.__init__ }}")[..1], [rule::DUNDER]);
    assert!(rules("{{ namespace.x }}").contains(&rule::GADGET.to_owned()));
}

#[test]
fn escape_techniques_are_caught() {
    let cases: &[(&str, &str)] = &[
        // The CVE-2024-34359 payload shape.
        (
            "{{ self.__init__.__globals__.__builtins__.__import__('os').popen('id').read() }}",
            rule::DUNDER,
        ),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", rule::DUNDER),
        ("{{ x|attr('__class__') }}", rule::DUNDER),
        ("{{ x['__globals__'] }}", rule::DUNDER),
        // Folded by the parser into one constant.
        ("{{ x['__glo' ~ 'bals__'] }}", rule::DUNDER),
        ("{{ x['__glo' + 'bals__'] }}", rule::DUNDER),
        ("{% set n = '__cla' %}{{ x[n ~ 'ss__'] }}", rule::DUNDER),
        ("{{ x|map(attribute='__class__')|list }}", rule::DUNDER),
        (
            "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
            rule::DUNDER,
        ),
        ("{{ joiner.x }}", rule::GADGET),
        ("{{ lipsum['x'] }}", rule::GADGET),
        ("{{ range.x }}", rule::GADGET),
        ("{{ config.items() }}", rule::GADGET),
        ("{{ request.application }}", rule::GADGET),
        ("{{ dict.x }}", rule::GADGET),
        ("{% import 'x.html' as x %}", rule::IMPORT),
        ("{% from 'x.html' import y %}", rule::IMPORT),
        ("{% include 'x' %}", rule::IMPORT),
        ("{% extends 'base' %}", rule::IMPORT),
        ("{{ os.system('id') }}", rule::DANGEROUS_NAME),
        ("{{ x.popen('id') }}", rule::DANGEROUS_NAME),
        ("{{ eval('1') }}", rule::DANGEROUS_NAME),
        ("{{ exec }}", rule::DANGEROUS_NAME),
        ("{{ subprocess }}", rule::DANGEROUS_NAME),
        ("{{ open('/etc/passwd') }}", rule::DANGEROUS_NAME),
        ("{{ getattr(x, 'y') }}", rule::DANGEROUS_NAME),
        ("{{ x|attr(name) }}", rule::COMPUTED_ATTRIBUTE),
        (
            "{% set u = '_' %}{{ x[u ~ u ~ 'class' ~ u ~ u] }}",
            rule::COMPUTED_ATTRIBUTE,
        ),
        (
            "{{ x['%c%cclass%c%c'|format(95, 95, 95, 95)] }}",
            rule::COMPUTED_ATTRIBUTE,
        ),
        (
            "{{ x[['_','_','class','_','_']|join] }}",
            rule::COMPUTED_ATTRIBUTE,
        ),
        // Inside a macro and a call block.
        ("{% macro m() %}{{ x.__class__ }}{% endmacro %}", rule::DUNDER),
        (
            "{% for i in range(3) %}{{ i.__class__ }}{% endfor %}",
            rule::DUNDER,
        ),
    ];
    for (src, rule) in cases {
        let found = check(src, "key k");
        assert!(
            found.iter().any(|f| f.rule == *rule),
            "{src}: expected {rule}, got {found:?}"
        );
        assert!(found.iter().all(|f| f.severity.is_blocking()), "{src}");
        assert!(
            found[0].location.starts_with("key k line 1 column"),
            "{}",
            found[0].location
        );
    }
}

#[test]
fn unparsable_template_is_a_finding() {
    let found = check("{% for x in %}", "k");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].rule, rule::PARSE);
    assert_eq!(found[0].severity, Severity::High);
    assert!(found[0].location.contains("line 1"), "{}", found[0].location);
}

#[test]
fn oversized_and_deeply_nested_templates_do_not_crash() {
    assert_eq!(rules(&"a".repeat(MAX_TEMPLATE_LEN + 1)), vec![rule::TOO_LARGE]);
    // A left-nested chain as long as the size limit allows.
    let chain = format!("{{{{ {}1 }}}}", "x+".repeat(MAX_TEMPLATE_LEN / 2 - 8));
    let found = check(&chain, "k");
    assert!(found.iter().all(|f| f.rule == rule::PARSE), "{:?}", &found[..1]);
    let nested = format!("{{{{ {}1{} }}}}", "(".repeat(10_000), ")".repeat(10_000));
    assert_eq!(rules(&nested), vec![rule::PARSE]);
    // The stack is sized by length: chains of every size in between fit.
    for pairs in [1_000, 10_000, 50_000, 200_000] {
        let chain = format!("{{{{ {}1 }}}}", "x+".repeat(pairs));
        let found = check(&chain, "k");
        assert!(
            found.iter().all(|f| f.rule == rule::PARSE),
            "{pairs}: {:?}",
            found.first()
        );
    }
}

#[test]
fn findings_are_capped() {
    let src = "{{ x.__a__ }}".repeat(100);
    let found = check(&src, "k");
    assert_eq!(found.len(), MAX_FINDINGS + 1);
    assert!(
        found[MAX_FINDINGS].message.contains("80 more"),
        "{}",
        found[MAX_FINDINGS].message
    );
}
