"""Operations built on the disk interface: create, convert, compare, map, measure, check."""
