//! Checks of the identifiers in member records: the 18-character citizen ID number (GB 11643:
//! address code, birth date, sequence whose last digit is odd for men, and an ISO 7064 MOD 11-2
//! check character) and mainland mobile numbers.

/// What an ID number says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdInfo {
    /// `YYYY-MM-DD`.
    pub birth_date: String,
    /// `male` or `female`.
    pub gender: &'static str,
}

const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
const CHECK: &[u8; 11] = b"10X98765432";

/// The check character the first 17 digits call for.
pub fn check_char(first17: &str) -> Option<char> {
    let digits: Vec<u32> = first17
        .chars()
        .map(|c| c.to_digit(10))
        .collect::<Option<_>>()?;
    if digits.len() != 17 {
        return None;
    }
    let sum: u32 = digits.iter().zip(WEIGHTS).map(|(d, w)| d * w).sum();
    Some(CHECK[(sum % 11) as usize] as char)
}

/// Upper-cases a trailing `x` and trims; what is stored.
pub fn normalise(id: &str) -> String {
    id.trim().to_ascii_uppercase()
}

/// Validates an ID number (already normalised) and reads the birth date and gender from it.
/// The error says what is wrong, in Chinese then English.
pub fn parse(id: &str) -> Result<IdInfo, String> {
    if id.len() != 18 || !id.is_ascii() {
        return Err("身份证号须为 18 位 (ID number must be 18 characters)".into());
    }
    let (first17, last) = id.split_at(17);
    let Some(expected) = check_char(first17) else {
        return Err("身份证号前 17 位须为数字 (first 17 characters must be digits)".into());
    };
    if !last.starts_with(expected) {
        return Err(format!(
            "身份证号校验位错误，应为 {expected} (bad check character, expected {expected})"
        ));
    }
    let (y, m, d) = (&id[6..10], &id[10..12], &id[12..14]);
    let date = format!("{y}-{m}-{d}");
    if !valid_date(&date) {
        return Err(format!(
            "身份证号中的出生日期 {date} 无效 (invalid birth date)"
        ));
    }
    let seq = id.as_bytes()[16] - b'0';
    Ok(IdInfo {
        birth_date: date,
        gender: if seq % 2 == 1 { "male" } else { "female" },
    })
}

/// A real calendar date `YYYY-MM-DD` between 1900 and 2100.
pub fn valid_date(s: &str) -> bool {
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .is_some_and(|d| {
            (1900..=2100).contains(&chrono::Datelike::year(&d))
                && d.format("%Y-%m-%d").to_string() == s
        })
}

/// A mainland mobile number: 11 digits starting 13–19 (an optional +86 or 86 prefix is dropped).
pub fn normalise_phone(phone: &str) -> Result<String, String> {
    let p: String = phone.chars().filter(|c| !matches!(c, ' ' | '-')).collect();
    let p = p
        .strip_prefix("+86")
        .or_else(|| p.strip_prefix("86").filter(|r| r.len() == 11))
        .unwrap_or(&p);
    let ok = p.len() == 11
        && p.starts_with('1')
        && matches!(p.as_bytes()[1], b'3'..=b'9')
        && p.bytes().all(|b| b.is_ascii_digit());
    if ok {
        Ok(p.to_string())
    } else {
        Err(format!(
            "手机号 {phone} 无效，须为 11 位大陆手机号 (invalid mobile number)"
        ))
    }
}

/// `110105199001011234` → `110105********1234`.
pub fn mask_id(id: &str) -> String {
    if id.len() < 10 || !id.is_ascii() {
        return "*".repeat(id.chars().count());
    }
    format!(
        "{}{}{}",
        &id[..6],
        "*".repeat(id.len() - 10),
        &id[id.len() - 4..]
    )
}

/// `13812345678` → `138****5678`.
pub fn mask_phone(phone: &str) -> String {
    if phone.len() != 11 || !phone.is_ascii() {
        return "*".repeat(phone.chars().count());
    }
    format!("{}****{}", &phone[..3], &phone[7..])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a valid number from its first 17 digits.
    fn valid(first17: &str) -> String {
        format!("{first17}{}", check_char(first17).unwrap())
    }

    #[test]
    fn the_standard_example_checks() {
        // GB 11643-1999 appendix example.
        assert_eq!(check_char("11010519491231002"), Some('X'));
        let info = parse("11010519491231002X").unwrap();
        assert_eq!(info.birth_date, "1949-12-31");
        assert_eq!(info.gender, "female");
    }

    #[test]
    fn bad_numbers_say_why() {
        assert!(parse("123").unwrap_err().contains("18"));
        assert!(parse("11010519491231002A").unwrap_err().contains("X"));
        assert!(parse("1101051949123100AX").unwrap_err().contains("digits"));
        assert!(
            parse(&valid("11010519490231001"))
                .unwrap_err()
                .contains("birth")
        );
        assert_eq!(parse(&valid("11010519900101001")).unwrap().gender, "male");
    }

    #[test]
    fn phones_and_masks() {
        assert_eq!(normalise_phone("+86 138-1234-5678").unwrap(), "13812345678");
        assert_eq!(normalise_phone("8613812345678").unwrap(), "13812345678");
        assert!(normalise_phone("12812345678").is_err());
        assert!(normalise_phone("1381234567").is_err());
        assert_eq!(mask_phone("13812345678"), "138****5678");
        assert_eq!(mask_id("11010519491231002X"), "110105********002X");
    }
}
