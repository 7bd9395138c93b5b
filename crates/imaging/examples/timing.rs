fn main() {
    let dir = std::path::Path::new(
        "/work/main/target/test-venv/lib/python3.11/site-packages/pydicom/data/test_files",
    );
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".dcm"))
        .collect();
    names.sort();
    for n in names {
        let b = std::fs::read(dir.join(&n)).unwrap();
        let t = std::time::Instant::now();
        let r = clinflow_imaging::parse_part10(&b);
        println!("{n} {:?} {}", t.elapsed(), r.is_ok());
    }
}
